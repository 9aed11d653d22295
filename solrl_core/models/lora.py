"""Trainable weights of a policy: two LoRA adapters on one transformer, or full fine-tuning.

LoRA (default): peft layers injected into `policy.transformer` with two adapters, "default"
(trained) and "old" (the sampling policy, equal to "default" at start). The reference policy is the
base model with adapters disabled.

Full fine-tuning (`add_lora(..., full_finetune=True)`, for small models): every transformer
parameter is trained and IS "default". "old" and the reference ("base") are separate parameter
copies kept on the module; `use_adapter(model, "old")` and `adapters_disabled(model)` swap those
tensors into the parameters (a pointer swap, no copy) and swap back on exit. Evaluate v_old / v_ref
inside the context and call backward() after leaving it, as with LoRA.

In both modes the same helpers apply: use_adapter, adapters_disabled, trainable_parameters,
adapter_state / load_adapter_state, make_inference_copy / refresh_inference_copy.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .base import FlowPolicy

TRAINED, SAMPLING, BASE = "default", "old", "base"
_FULL_ATTR = "_solrl_full_copies"  # {"old": {param name: tensor}, "base": {...}} in full fine-tuning


def add_lora(policy: FlowPolicy, lora_rank: int = 32, lora_alpha: float = 64, init: str | bool = "gaussian",
             target_modules: Sequence[str] | None = None, dropout: float = 0.0,
             full_finetune: bool = False) -> nn.Module:
    """Make `policy.transformer` trainable; returns it. "default" is active and trainable.

    target_modules: module-name suffixes (peft semantics); default `policy.lora_target_modules`.
    init: peft's init_lora_weights ("gaussian": A ~ N(0, 1/lora_rank), B = 0, so the adapters start as
    the identity and the policy equals the base model).
    """
    model = policy.transformer
    if full_finetune:
        model.requires_grad_(True)
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
        setattr(model, _FULL_ATTR, {SAMPLING: snapshot, BASE: {n: t.clone() for n, t in snapshot.items()}})
        return model
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(target_modules or policy.lora_target_modules)
    config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, init_lora_weights=init, target_modules=targets,
                        lora_dropout=dropout)
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=TRAINED)
    with warnings.catch_warnings():  # a second adapter on one model is what we want here
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(copy.deepcopy(config), model, adapter_name=SAMPLING)
    load_adapter_state(model, SAMPLING, adapter_state(model, TRAINED))
    _set_active(model, TRAINED)
    return model


def is_full_finetune(model: nn.Module) -> bool:
    return hasattr(model, _FULL_ATTR)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every peft LoRA layer in the model."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    if is_full_finetune(model):
        return [TRAINED, SAMPLING]
    for _, layer in lora_layers(model):
        return list(layer.lora_A.keys())
    return []


# --- switching --------------------------------------------------------------------------------
def _set_active(model: nn.Module, name: str) -> None:
    for _, layer in lora_layers(model):
        layer.set_adapter(name)


def _active(model: nn.Module) -> str:
    for _, layer in lora_layers(model):
        return layer.active_adapters[0]
    return TRAINED


@contextmanager
def _keep_requires_grad(model: nn.Module):
    # peft's set_adapter / enable_adapters flip requires_grad; restore the caller's flags exactly.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _swapped_in(model: nn.Module, copies: dict[str, Tensor]):
    params = dict(model.named_parameters())
    for name, tensor in copies.items():
        params[name].data, copies[name] = tensor, params[name].data
    try:
        yield model
    finally:
        for name, tensor in copies.items():
            params[name].data, copies[name] = tensor, params[name].data


@contextmanager
def use_adapter(model: nn.Module, name: str):
    """Run `model` with adapter `name` ("default" or "old") active; restores the previous state."""
    if is_full_finetune(model):
        if name == TRAINED:
            yield model
            return
        with _swapped_in(model, _full_copies(model, name)):
            yield model
        return
    _check_adapter(model, name)
    previous = _active(model)
    with _keep_requires_grad(model):
        _set_active(model, name)
        try:
            yield model
        finally:
            _set_active(model, previous)


@contextmanager
def adapters_disabled(model: nn.Module):
    """Run `model` as the reference policy: the base weights, adapters off."""
    if is_full_finetune(model):
        with _swapped_in(model, _full_copies(model, BASE)):
            yield model
        return
    layers = [layer for _, layer in lora_layers(model)]
    with _keep_requires_grad(model):
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield model
        finally:
            for layer in layers:
                layer.enable_adapters(True)


# --- parameters and state --------------------------------------------------------------------
def trainable_parameters(model: nn.Module, name: str = TRAINED) -> list[nn.Parameter]:
    """The parameters an optimizer should update for adapter `name` (all of them in full FT)."""
    if is_full_finetune(model):
        if name != TRAINED:
            raise ValueError(f"in full fine-tuning only {TRAINED!r} is trained; {name!r} is a frozen copy")
        return list(model.parameters())
    _check_adapter(model, name)
    return [p for n, p in model.named_parameters() if _is_adapter_param(n, name)]


def adapter_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """A detached copy of adapter `name`'s weights, keyed without the adapter name."""
    if is_full_finetune(model):
        source = dict(model.named_parameters()) if name == TRAINED else _full_copies(model, name)
        return {k: v.detach().clone() for k, v in source.items()}
    _check_adapter(model, name)
    return {n.replace(f".{name}.", "."): p.detach().clone() for n, p in model.named_parameters()
            if _is_adapter_param(n, name)}


@torch.no_grad()
def load_adapter_state(model: nn.Module, name: str, state: dict[str, Tensor]) -> None:
    """Copy `state` (from `adapter_state`) into adapter `name`, in place (optimizer refs stay valid)."""
    if is_full_finetune(model):
        target = dict(model.named_parameters()) if name == TRAINED else _full_copies(model, name)
        _copy_into(target, state, name)
        return
    _check_adapter(model, name)
    target = {n.replace(f".{name}.", "."): p for n, p in model.named_parameters() if _is_adapter_param(n, name)}
    _copy_into(target, state, name)


def _copy_into(target: dict[str, Tensor], state: dict[str, Tensor], name: str) -> None:
    missing = set(target) - set(state)
    if missing:
        raise KeyError(f"adapter state for {name!r} lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    for key, tensor in target.items():
        tensor.data.copy_(state[key].to(tensor.device, tensor.dtype))


def _is_adapter_param(param_name: str, name: str) -> bool:
    return ".lora_" in param_name and f".{name}." in param_name


def _full_copies(model: nn.Module, name: str) -> dict[str, Tensor]:
    copies = getattr(model, _FULL_ATTR)
    if name not in copies:
        raise ValueError(f"unknown weights {name!r} in full fine-tuning: use one of {TRAINED}, "
                         f"{', '.join(copies)}")
    return copies[name]


def _check_adapter(model: nn.Module, name: str) -> None:
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"adapter {name!r} is not on this model (has: {names or 'none; call add_lora first'})")


# --- inference copies ------------------------------------------------------------------------
@torch.no_grad()
def merged_weights(model: nn.Module, name: str = SAMPLING) -> dict[str, Tensor]:
    """Module name -> base weight + LoRA delta of adapter `name`, for every LoRA-targeted layer.

    In full fine-tuning: parameter name -> that copy's tensor, for every parameter.
    """
    if is_full_finetune(model):
        source = dict(model.named_parameters()) if name == TRAINED else _full_copies(model, name)
        return {k: v.detach() for k, v in source.items()}
    _check_adapter(model, name)
    merged = {}
    for module_name, layer in lora_layers(model):
        base = layer.get_base_layer()
        merged[module_name] = base.weight.detach() + layer.get_delta_weight(name).to(base.weight.dtype)
    return merged


@torch.no_grad()
def make_inference_copy(policy: FlowPolicy, adapter: str = SAMPLING) -> nn.Module:
    """A separate plain transformer: base weights with `adapter` merged; no peft layers, frozen.

    The trained model is not modified. Quantize the copy afterwards if wanted. A model without
    adapters (no add_lora yet) gives a plain frozen copy of the base weights.
    """
    model = policy.transformer
    if is_full_finetune(model):
        copies = model.__dict__.pop(_FULL_ATTR)  # don't deep-copy the old/base parameter copies
        try:
            clone = copy.deepcopy(model)
        finally:
            setattr(model, _FULL_ATTR, copies)
        weights = merged_weights(model, adapter)
        for n, p in clone.named_parameters():
            p.copy_(weights[n])
    elif not adapter_names(model):
        clone = copy.deepcopy(model)
    else:
        clone = copy.deepcopy(model)
        weights = merged_weights(model, adapter)
        for module_name, layer in list(lora_layers(clone)):
            base = layer.get_base_layer()
            base.weight.copy_(weights[module_name])
            parent_name, _, attr = module_name.rpartition(".")
            setattr(clone.get_submodule(parent_name) if parent_name else clone, attr, base)
        # peft tags the model with its config; the plain copy carries no adapters.
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            clone.__dict__.pop(attr, None)
    return clone.eval().requires_grad_(False)


@torch.no_grad()
def refresh_inference_copy(copies: nn.Module | Sequence[nn.Module], policy: FlowPolicy,
                           adapter: str = SAMPLING) -> nn.Module | Sequence[nn.Module]:
    """Recompute, in place, the merged weights of the LoRA-targeted layers only (cheap).

    `copies`: one inference copy or several (the merge is computed once for all of them). A layer
    that defines `load_merged_weight(weight)` (e.g. a quantized linear) is given the new
    full-precision weight to re-quantize itself; other layers get `weight.copy_`.
    """
    if not is_full_finetune(policy.transformer) and not adapter_names(policy.transformer):
        return copies  # nothing trained, nothing to refresh
    weights = merged_weights(policy.transformer, adapter)
    for copy_model in [copies] if isinstance(copies, nn.Module) else copies:
        if is_full_finetune(policy.transformer):
            params = dict(copy_model.named_parameters())
            for key, weight in weights.items():
                params[key].copy_(weight)
            continue
        for module_name, weight in weights.items():
            module = copy_model.get_submodule(module_name)
            loader = getattr(module, "load_merged_weight", None)
            if loader is not None:
                loader(weight)
            else:
                module.weight.copy_(weight)
    return copies
