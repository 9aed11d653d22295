"""A training run's live state, and its save / resume.

Everything needed to continue lives in the run directory (adapters default / old / EMA, optimizer,
iteration, prompt cursor, metrics); every random draw of an iteration comes from generators
seeded by (run seed, iteration, purpose), so a resumed run repeats exactly what an uninterrupted
one would have done. Nodes pass the session object itself (a handle), never copies of it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models import (
    Conditioning,
    FlowPolicy,
    adapter_state,
    add_lora,
    load_adapter_state,
    make_inference_copy,
    refresh_inference_copy,
    use_adapter,
)
from ..models.lora import SAMPLING, TRAINED, is_full_finetune, merged_weights, trained_forward
from ..quant import QuantConfig, QuantReport, quantize_model, requantize_model
from ..runtime import distributed as dp
from ..runtime.files import atomic_write_text
from ..runtime.metrics import metrics_log
from .checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)
from .offload import Offloader
from .optimizers import build_optimizer, kind_of, load_portable_state, portable_state, set_hyperparameters
from .prompts import PromptCursor, split_prompts
from .settings import RequantizeSettings, SessionConfig

log = logging.getLogger("solrl")

EMA = "ema"  # the EMA copy of the trained adapter, kept by the session (evaluation and export)


@dataclass
class InferenceCopies:
    """The sampling policy merged into plain copies: full precision (None: the regenerator samples
    through the trained model with the sampling adapter active) and low precision."""

    regenerator: nn.Module | None
    explorer: nn.Module | None = None
    backend: str = "none"
    backend_reason: str = ""
    quant_report: dict[str, Any] = field(default_factory=dict)
    settings: RequantizeSettings | None = None  # what the explorer was made with


class TrainingSession:
    def __init__(self, run_dir: Path, policy: FlowPolicy, prompts: list[str], config: SessionConfig,
                 resume: bool = True):
        self.run_dir = Path(run_dir)
        self.policy = policy
        self.prompt_set = prompts
        # Training draws only from `prompts`; the Held-out Reward scores only `held_out_prompts`.
        self.prompts, self.held_out_prompts = split_prompts(prompts, config.held_out, config.seed)
        self.config = config
        self.iteration = 0
        self.cursor = PromptCursor()
        self.metrics: list[dict[str, Any]] = []
        self.ema: dict[str, Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_settings: dict[str, Any] | None = None
        self.copies: InferenceCopies | None = None
        self.copies_iteration = -1
        self.pending: dict[str, Any] = {}
        self.pending_cursor: PromptCursor | None = None
        self._batches: list[weakref.ref] = []  # this iteration's sample batches, released at commit
        self.offload = Offloader()
        self._prepare_model()
        self.set_offload(config.offload_frozen)
        checkpoint = resumable_checkpoint(self.run_dir, config) if resume else None
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            self._fresh(replace_old_run=not resume)

    # --- set-up ---------------------------------------------------------------------------
    def _prepare_model(self) -> None:
        model = self.policy.transformer
        init = getattr(model, "_solrl_initial_adapters", None)
        if init is None:
            # LoRA init is random: seed it so a run is reproducible from its seed alone.
            torch.manual_seed(self.config.seed)
            add_lora(self.policy, lora_rank=self.config.lora_rank, lora_alpha=self.config.lora_alpha,
                     full_finetune=self.config.full_finetune)
            model._solrl_initial_adapters = (self.config, adapter_state(model, TRAINED))
        elif init[0].lora_rank != self.config.lora_rank or init[0].full_finetune != self.config.full_finetune:
            raise ValueError("this policy already carries adapters of another shape; load the policy again "
                             "for a run with a different LoRA rank or fine-tuning mode")

    def _fresh(self, replace_old_run: bool) -> None:
        initial = self.policy.transformer._solrl_initial_adapters[1]
        for name in (TRAINED, SAMPLING):
            load_adapter_state(self.policy.transformer, name, initial)
        self.ema = {k: v.clone() for k, v in initial.items()}
        if dp.is_main():
            if replace_old_run:  # mode "new"; "continue" never deletes (latest_checkpoint refuses instead)
                shutil.rmtree(self.run_dir / CHECKPOINTS, ignore_errors=True)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            info = {**asdict(self.config), "held_out_prompts": self.held_out_prompts}
            atomic_write_text(self.run_dir / "session.json", json.dumps(info, indent=1) + "\n")
        metrics_log(self.run_dir).restore([])  # a new run in an old directory drops the old run's iterations
        dp.barrier()

    def _restore(self, path: Path) -> None:
        tensors, optimizer, meta = load_checkpoint(path)
        if meta.get("held_out_prompts", self.held_out_prompts) != self.held_out_prompts:
            # An edited prompt set can move prompts across the split: a prompt scored as held out
            # would then be trained on. Refuse rather than blur the curve.
            raise ValueError(f"run directory {self.run_dir}: the prompt set changed, and with it the prompts "
                             f"held out (held_out={self.config.held_out}); choose mode 'new' or another run name")
        model = self.policy.transformer
        for name in (TRAINED, SAMPLING):
            load_adapter_state(model, name, _strip(tensors, name))
        self.ema = _strip(tensors, EMA)
        self.iteration = meta["iteration"]
        self.cursor = PromptCursor(**meta["cursor"])
        self.metrics = meta["metrics"]
        self.optimizer_settings = meta.get("optimizer_settings")
        if optimizer is not None and self.optimizer_settings is not None:
            load_portable_state(self.make_optimizer(self.optimizer_settings), optimizer)
        # The log may hold rows of an iteration that never reached its checkpoint, or lack the row of
        # one that did; other rows (Log Metric) stay.
        metrics_log(self.run_dir).restore(self.metrics)
        log.info("resumed %s at iteration %d", self.run_dir, self.iteration)

    # --- randomness -----------------------------------------------------------------------
    def seed_for(self, purpose: str) -> int:
        digest = hashlib.sha256(f"{self.config.seed}/{self.iteration}/{purpose}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)

    def generator(self, purpose: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed_for(purpose))

    # --- per-iteration inputs -----------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.iteration >= self.config.total_iterations

    def next_prompts(self, count: int) -> list[str]:
        prompts, self.pending_cursor = self.cursor.take(self.prompts, count, self.config.seed)
        return prompts

    def draw_seeds(self, prompts: int, per_prompt: int) -> Tensor:
        """[P, N] sample seeds for this iteration; each seed alone fixes its initial noise."""
        return torch.randint(0, 2**31 - 1, (prompts, per_prompt), generator=self.generator("seeds"))

    # --- memory ---------------------------------------------------------------------------------
    def set_offload(self, enabled: bool) -> None:
        """Training Run's offload_frozen: text encoders wait on the CPU from now on (the explorer and
        reward models are parked by their stages)."""
        self.offload.set_enabled(enabled)
        self.offload.park(*self.policy.text_encoders())

    def encode(self, prompts: list[str]) -> Conditioning:
        """The policy's conditioning; text encoders brought to the device only for a cache miss."""
        if self.policy.is_cached(prompts):
            return self.policy.encode(prompts)
        with self.offload.resident(*self.policy.text_encoders()):
            return self.policy.encode(prompts)

    # --- inference copies (Requantize) --------------------------------------------------------
    def refresh_copies(self, s: RequantizeSettings, cache_dequantized: bool = True) -> InferenceCopies:
        """Merge the sampling adapter into the full-precision and low-precision copies (with
        `regenerator` "adapter", the low-precision one only). Settings changed between presses apply:
        the merged copy is made or dropped, and a changed explorer setting makes the explorer again, as a
        resumed run would."""
        start = time.perf_counter()
        merged = s.regenerator == "merged_copy"
        if self.copies is not None and merged != (self.copies.regenerator is not None):
            # The regenerator setting changed between presses: build or drop the merged copy.
            self.copies.regenerator = make_inference_copy(self.policy, SAMPLING) if merged else None
        if self.copies is None:
            self.copies = InferenceCopies(make_inference_copy(self.policy, SAMPLING) if merged else None)
            self._make_explorer(s, cache_dequantized)
        elif replace(s, regenerator=self.copies.settings.regenerator) != self.copies.settings:
            if self.copies_iteration != self.iteration and self.copies.regenerator is not None:
                refresh_inference_copy(self.copies.regenerator, self.policy, SAMPLING)
            self._make_explorer(s, cache_dequantized)
        elif self.copies_iteration != self.iteration:
            regen, explorer = self.copies.regenerator, self.copies.explorer
            self.offload.fetch(explorer)  # parked after the last exploration
            if explorer is not None and is_full_finetune(self.policy.transformer):
                if regen is not None:
                    refresh_inference_copy(regen, self.policy, SAMPLING)
                    requantize_model(explorer, regen)
                else:  # the merged weights at the policy's dtype, as a merged copy would hold them
                    weights = merged_weights(self.policy.transformer, SAMPLING)
                    requantize_model(explorer, {k: v.to(self.policy.dtype) for k, v in weights.items()})
            else:  # LoRA: one merge refreshes both copies; the explorer re-quantizes only those layers
                refresh_inference_copy([c for c in (regen, explorer) if c is not None], self.policy, SAMPLING)
        self.copies_iteration = self.iteration
        self.pending["time_requantize"] = time.perf_counter() - start
        self.pending["quant_backend"] = self.copies.backend
        self.pending["regenerator"] = s.regenerator
        self.pending["offload_frozen"] = self.offload.enabled
        return self.copies

    def _make_explorer(self, s: RequantizeSettings, cache_dequantized: bool) -> None:
        """A low-precision copy of the sampling policy made from scratch (none for backend 'none')."""
        copies = self.copies
        copies.explorer, copies.settings = None, s  # the old explorer is freed before the new one is made
        report = QuantReport("none", "full precision only")
        if s.backend != "none":
            copies.explorer = make_inference_copy(self.policy, SAMPLING)
            qc = QuantConfig.for_family(self.policy.family, None if s.min_dim < 0 else s.min_dim,
                                        weight_tile=s.tile, cache_dequantized=cache_dequantized)
            report = quantize_model(copies.explorer, qc, backend=s.backend)
            log.info("explorer: %s", report.summary())
        copies.backend, copies.backend_reason, copies.quant_report = (report.backend, report.backend_reason,
                                                                      report.to_dict())
        if dp.is_main():
            atomic_write_text(self.run_dir / "quant_report.json", json.dumps(copies.quant_report, indent=1) + "\n")

    @contextmanager
    def sampling_model(self, precision: str) -> Iterator[nn.Module]:
        """The sampling policy to sample with: the low-precision explorer, or at full precision the
        merged copy, or (regenerator "adapter") the trained model with the sampling adapter active."""
        if self.copies is None or self.copies_iteration != self.iteration:
            raise RuntimeError("the inference copies are stale: run Requantize at the start of each iteration")
        if precision == "low":
            if self.copies.explorer is None:
                raise RuntimeError("Requantize ran with backend 'none': there is no low-precision explorer")
            yield self.copies.explorer
        elif self.copies.regenerator is not None:
            yield self.copies.regenerator
        else:
            model = self.policy.transformer
            with use_adapter(model, SAMPLING), trained_forward(self.policy):
                yield model

    # --- optimizer ------------------------------------------------------------------------
    def make_optimizer(self, settings: dict[str, Any]) -> torch.optim.Optimizer:
        from ..models.lora import trainable_parameters

        self.optimizer = build_optimizer(trainable_parameters(self.policy.transformer, TRAINED), settings)
        self.optimizer_settings = dict(settings)
        return self.optimizer

    def get_optimizer(self, settings: dict[str, Any]) -> torch.optim.Optimizer:
        kind = settings.get("kind", "adamw")
        if self.optimizer is None or (kind != kind_of(self.optimizer) and not self.optimizer.state):
            return self.make_optimizer(settings)
        if kind != kind_of(self.optimizer):
            raise ValueError(f"UpdateSettings.optimizer: this run's optimizer state is {kind_of(self.optimizer)!r}, "
                             f"not {kind!r}; keep {kind_of(self.optimizer)!r} or start a new run (mode new)")
        set_hyperparameters(self.optimizer, settings)  # hyper-parameters edited between queues apply
        self.optimizer_settings = dict(settings)
        return self.optimizer

    def track(self, batch: Any) -> None:
        self._batches.append(weakref.ref(batch))

    # --- end of iteration -----------------------------------------------------------------
    def commit(self, row: dict[str, Any]) -> None:
        """Finish the iteration: advance counters, checkpoint atomically, append the metrics row."""
        row = {"iteration": self.iteration, **self.pending, **row}
        self.iteration += 1
        if self.pending_cursor is not None:
            self.cursor = self.pending_cursor
        self.pending_cursor = None
        self.pending = {}
        self.metrics.append(row)
        model = self.policy.transformer
        tensors = {f"{TRAINED}.{k}": v for k, v in adapter_state(model, TRAINED).items()}
        tensors.update({f"{SAMPLING}.{k}": v for k, v in adapter_state(model, SAMPLING).items()})
        tensors.update({f"{EMA}.{k}": v for k, v in self.ema.items()})
        meta = {"config": asdict(self.config), "iteration": self.iteration, "cursor": asdict(self.cursor),
                "metrics": self.metrics, "optimizer_settings": self.optimizer_settings,
                "held_out_prompts": self.held_out_prompts}
        if dp.is_main():  # every process holds the same weights and optimizer state
            save_checkpoint(self.run_dir, self.iteration, tensors,
                            portable_state(self.optimizer) if self.optimizer is not None else None, meta)
        metrics_log(self.run_dir).append(row)
        dp.barrier()
        for ref in self._batches:
            batch = ref()
            if batch is not None:
                batch.release()
        self._batches = []


def _strip(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def resumable_checkpoint(run_dir: Path, config: SessionConfig) -> Path | None:
    """The checkpoint mode 'continue' resumes from (None: the run has none yet). Reads only; raises
    CheckpointError for a missing or broken checkpoint and for one saved with other run settings.
    Training Run checks this at validation, before anything is computed or written."""
    path = latest_checkpoint(run_dir)
    if path is not None:
        try:
            saved = SessionConfig(**read_state(path)["config"]).run_identity()
        except (TypeError, ValueError) as e:  # saved by another version, or edited by hand
            raise CheckpointError(f"{path}: its run settings cannot be read ({e})") from None
        given = config.run_identity()
        diff = {k: (saved[k], v) for k, v in given.items() if saved[k] != v}
        if diff:
            raise CheckpointError(f"run directory {run_dir} holds a run with other settings {diff} (saved, given); "
                                  "choose mode 'new' or another run name")
    return path


_SESSIONS: dict[str, TrainingSession] = {}


def open_session(run_dir: Path, policy: FlowPolicy, prompts: list[str], config: SessionConfig,
                 mode: str = "continue") -> TrainingSession:
    """The session of a run directory: reused in-process when nothing changed (ComfyUI re-queue),
    else resumed from its latest checkpoint ("continue") or started afresh ("new")."""
    key = str(Path(run_dir).resolve())
    live = _SESSIONS.get(key)
    if (mode == "continue" and live is not None and live.policy is policy
            and live.config.run_identity() == config.run_identity() and live.prompt_set == prompts):
        live.config = config  # settings that may change between presses (offloading)
        live.set_offload(config.offload_frozen)
        return live
    session = TrainingSession(run_dir, policy, prompts, config, resume=(mode == "continue"))
    _SESSIONS[key] = session
    return session
