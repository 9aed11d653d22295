"""Activation memory of each stage, traced on meta-device models built from a pipeline's configs.

The traced code is the product's own: `policy.velocity` (sampling steps), the NFT update's three
forwards, loss and backward through peft's LoRA layers (`use_adapter`, `adapters_disabled`,
`nft_loss`), `policy.decode`, the text encoders' forward. Transformers are traced at a few blocks
(the real-width slice depth and one block more per kind of block) and the per-block difference is
extrapolated to the full depth, which is exact when blocks of a kind allocate alike (checked
against a full-depth trace in the tests) and keeps a plan at a few seconds.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.base import Conditioning, FlowPolicy
from ..models.loading import policy_from_components, read_settings
from ..models.lora import SAMPLING, adapters_disabled, add_lora, trainable_parameters, use_adapter
from ..models.published import build_component, build_scheduler, component_config, pipeline_index
from ..models.slices import SLICE_DEPTH
from ..quant.layers import as_matrix
from ..quant.model import select_layers
from ..train.nft import nft_loss, noised
from .trace import trace_peak

META = torch.device("meta")


def meta_policy(folder: Path, family: str, dtype: torch.dtype, depth: dict[str, int] | None = None,
                settings: dict | None = None) -> FlowPolicy:
    """The family's adapter around a meta-device transformer (optionally fewer blocks) and VAE;
    no text encoders (conditioning is given as shapes). `settings`: adapter options over those of the
    folder's solrl.json (resolution, max_sequence_length, ...), as load_policy takes them."""
    index = pipeline_index(folder)
    components: dict = dict.fromkeys(("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                                      "tokenizer_2", "tokenizer_3", *index))
    components["transformer"] = build_component(folder, "transformer", META, dtype, **(depth or {}))
    if "vae" in index:
        components["vae"] = build_component(folder, "vae", META, dtype)
    components["scheduler"] = build_scheduler(folder)
    options = {**read_settings(folder), **(settings or {})}
    return policy_from_components(family, components, META, dtype, str(folder), **options)


def placeholder_conditioning(policy: FlowPolicy, batch: int, device: torch.device = META) -> Conditioning:
    shape = policy.conditioning_shape()
    embeds = torch.zeros(batch, shape.tokens, shape.width, device=device, dtype=policy.dtype)
    mask = torch.ones(batch, shape.tokens, device=device, dtype=torch.long) if shape.masked else None
    pooled = torch.zeros(batch, shape.pooled, device=device, dtype=policy.dtype) if shape.pooled else None
    return Conditioning(embeds, mask, pooled)


def conditioning_bytes(policy: FlowPolicy, rows: int) -> int:
    """Bytes of `rows` rows of encoded prompts at the policy's dtype (mask: int64)."""
    shape = policy.conditioning_shape()
    size = torch.empty((), dtype=policy.dtype).element_size()
    per_row = (shape.tokens * shape.width + (shape.pooled or 0)) * size + (8 * shape.tokens if shape.masked else 0)
    return rows * per_row


class ExplorerStandIn(nn.Module):
    """What a quantized layer allocates per call, on meta (quant/layers.py, per backend):
    emulated: an fp32 copy of the input, its NVFP4 codes and scales, the dequantized input, an fp32
    output (and the dequantized weight when it is not cached); te_*: FP8 / FP4 copies of input and
    weight; cpu_int8: fp32 input, int8 input, fp32 output."""

    def __init__(self, module: nn.Module, backend: str, cache_dequantized: bool):
        super().__init__()
        w = as_matrix(module.weight)
        self.out_features, self.in_features = w.shape
        self.backend, self.cache = backend, cache_dequantized
        self.pointwise = isinstance(module, nn.Conv2d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pointwise:
            x = x.movedim(1, -1)
        rows = x.numel() // self.in_features
        k, n = self.in_features, self.out_features
        scratch = []
        if self.backend == "emulated":
            scratch += [x.float().contiguous(), x.new_empty((rows, k * 9 // 16), dtype=torch.uint8),
                        x.new_empty((rows, k), dtype=torch.float32)]
            if not self.cache:
                scratch.append(x.new_empty((n, k), dtype=torch.float32))
            out = x.new_empty((*x.shape[:-1], n), dtype=torch.float32).to(x.dtype)
        elif self.backend == "cpu_int8":
            scratch += [x.float().contiguous(), x.new_empty((rows, k), dtype=torch.uint8)]
            out = x.new_empty((*x.shape[:-1], n), dtype=torch.float32).to(x.dtype)
        else:
            scratch += [x.new_empty((rows, k), dtype=torch.uint8), x.new_empty((n, k), dtype=torch.uint8)]
            out = x.new_empty((*x.shape[:-1], n))
        del scratch
        return out.movedim(-1, 1) if self.pointwise else out


def with_explorer_stand_ins(model: nn.Module, quant_config, backend: str, cache_dequantized: bool) -> nn.Module:
    chosen, _ = select_layers(model, quant_config)
    for name, module in chosen.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                ExplorerStandIn(module, backend, cache_dequantized))
    return model


@dataclass(frozen=True)
class UpdateOptions:
    lora_rank: int = 32
    lora_alpha: float = 64.0
    full_finetune: bool = False
    trained_dtype: torch.dtype | None = None  # None: the model's dtype (what peft does today)
    gradient_checkpointing: bool = False
    kl: bool = True


def sampling_step(policy: FlowPolicy, model: nn.Module, batch: int) -> Callable[[], torch.Tensor]:
    """One no-grad velocity call at `batch` samples, inputs made inside (on the policy's device)."""
    latent, device = policy.latent_shape(), policy.device

    def step():
        with torch.no_grad():
            x = torch.randn(batch, *latent, device=device)
            sigma = torch.full((batch,), 0.5, device=device)
            return policy.velocity(model, x, sigma, placeholder_conditioning(policy, batch, device))

    return step


def sampling_step_trace(policy: FlowPolicy, model: nn.Module, batch: int) -> int:
    return trace_peak(sampling_step(policy, model, batch)).peak


def prepare_trained(policy: FlowPolicy, options: UpdateOptions) -> list[torch.nn.Parameter]:
    """Adapters as the session adds them; gradients allocated up front (they are counted as a
    component of the update stage, not as activations)."""
    with torch.device(policy.transformer.device):  # peft builds the adapter layers on the default device
        add_lora(policy, lora_rank=options.lora_rank, lora_alpha=options.lora_alpha,
                 full_finetune=options.full_finetune)
    params = trainable_parameters(policy.transformer)
    if options.trained_dtype is not None:
        for p in params:
            p.data = p.data.to(options.trained_dtype)
    for p in params:
        p.grad = torch.zeros_like(p)
    if options.gradient_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    return params


def update_pair(policy: FlowPolicy, micro_batch: int, options: UpdateOptions) -> Callable[[], None]:
    """One (micro-batch, timestep) pair of the NFT update as train/stages.update runs it: v_old and
    v_ref without gradient, v with gradient, the loss and its backward."""
    model, latent, device = policy.transformer, policy.latent_shape(), policy.device

    def pair():
        x0 = torch.randn(micro_batch, *latent, device=device)
        eps = torch.randn_like(x0)
        t = torch.full((micro_batch,), 0.5, device=device)
        r = torch.full((micro_batch,), 0.5, device=device)
        cond = placeholder_conditioning(policy, micro_batch, device)
        x_t = noised(x0, eps, t)
        with torch.no_grad():
            with use_adapter(model, SAMPLING):
                v_old = policy.velocity(model, x_t, t, cond).float()
            v_ref = None
            if options.kl:
                with adapters_disabled(model):
                    v_ref = policy.velocity(model, x_t, t, cond).float()
        model.train()
        v = policy.velocity(model, x_t, t, cond).float()
        out = nft_loss(v, v_old, v_ref, x_t, x0, t, r)
        out.loss.backward()
        model.eval()

    return pair


def update_pair_trace(policy: FlowPolicy, micro_batch: int, options: UpdateOptions) -> int:
    return trace_peak(update_pair(policy, micro_batch, options)).peak


def adapter_sampling_trace(policy: FlowPolicy, batch: int) -> int:
    """A regeneration step through the trained model with the sampling adapter active (no merged copy)."""
    with use_adapter(policy.transformer, SAMPLING):
        return sampling_step_trace(policy, policy.transformer, batch)


def decode_trace(policy: FlowPolicy, batch: int) -> int:
    latent = policy.latent_shape()

    def decode():
        return policy.decode(torch.empty(batch, *latent, device=META))

    return trace_peak(decode).peak


def linear_in(measure: Callable[[int], int], n: int) -> int:
    """measure(n) for a measure linear in n, from n = 1 and 2."""
    one = measure(1)
    return one if n <= 1 else one + (n - 1) * (measure(2) - one)


def by_depth(family: str, full: dict[str, int], measure: Callable[[dict[str, int]], int]) -> int:
    """measure(full depth), from traces at the slice depth and one block more of each kind."""
    base = SLICE_DEPTH[family]
    if any(full[k] <= v + 1 for k, v in base.items()):
        return measure(full)
    first = measure(base)
    return first + sum((full[k] - v) * (measure({**base, k: v + 1}) - first) for k, v in base.items())


def depth_of(folder: Path, family: str) -> dict[str, int]:
    config = component_config(folder, "transformer")
    return {k: int(config[k]) for k in SLICE_DEPTH[family]}


def text_encoder_trace(folder: Path, name: str, dtype: torch.dtype, tokens: int) -> int:
    """One prompt through a text encoder (prompts are encoded one at a time). No gradient: the peak
    sits inside one layer, so one layer of the real width is traced."""
    config = component_config(folder, name)
    encoder = build_component(folder, name, META, dtype, **one_layer(config))
    if config.get("model_type") == "clip_text_model":
        tokens = int(config.get("max_position_embeddings", 77))

    def encode():
        with torch.no_grad():
            ids = torch.zeros(1, tokens, dtype=torch.long, device=META)
            return encoder(input_ids=ids)

    return trace_peak(encode).peak


def one_layer(config: dict) -> dict:
    """Config overrides for a one-layer version of a transformers text model."""
    overrides = {k: 1 for k in ("num_hidden_layers", "num_layers", "num_decoder_layers") if k in config}
    if "layer_types" in config:
        overrides["layer_types"] = config["layer_types"][:1]
    return overrides
