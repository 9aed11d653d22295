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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models import (
    FlowPolicy,
    adapter_state,
    add_lora,
    load_adapter_state,
    make_inference_copy,
    refresh_inference_copy,
)
from ..models.lora import SAMPLING, TRAINED, is_full_finetune
from ..quant import QuantConfig, quantize_model, requantize_model
from ..runtime import distributed as dp
from ..runtime.files import atomic_write_text
from ..runtime.metrics import metrics_log
from .checkpoint import CHECKPOINTS, latest_checkpoint, load_checkpoint, save_checkpoint
from .prompts import PromptCursor, split_prompts
from .settings import RequantizeSettings, SessionConfig

log = logging.getLogger("solrl")

EMA = "ema"  # the EMA copy of the trained adapter, kept by the session (evaluation and export)


@dataclass
class InferenceCopies:
    """The sampling policy merged into plain copies: full precision and low precision."""

    regenerator: nn.Module
    explorer: nn.Module | None = None
    backend: str = "none"
    backend_reason: str = ""
    quant_report: dict[str, Any] = field(default_factory=dict)


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
        self._prepare_model()
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            self._fresh()

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

    def _fresh(self) -> None:
        initial = self.policy.transformer._solrl_initial_adapters[1]
        for name in (TRAINED, SAMPLING):
            load_adapter_state(self.policy.transformer, name, initial)
        self.ema = {k: v.clone() for k, v in initial.items()}
        if dp.is_main():
            shutil.rmtree(self.run_dir / CHECKPOINTS, ignore_errors=True)  # "new" replaces an old run
            self.run_dir.mkdir(parents=True, exist_ok=True)
            info = {**asdict(self.config), "held_out_prompts": self.held_out_prompts}
            atomic_write_text(self.run_dir / "session.json", json.dumps(info, indent=1) + "\n")
        metrics_log(self.run_dir).restore([])  # a new run in an old directory drops the old run's iterations
        dp.barrier()

    def _restore(self, path: Path) -> None:
        tensors, optimizer, meta = load_checkpoint(path)
        saved = SessionConfig(**meta["config"])
        if saved != self.config:
            diff = {k: (getattr(saved, k), getattr(self.config, k)) for k in asdict(saved)
                    if getattr(saved, k) != getattr(self.config, k)}
            raise ValueError(f"run directory {self.run_dir} holds a run with other settings {diff} "
                             "(saved, given); choose mode 'new' or another run name")
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
            self.make_optimizer(self.optimizer_settings).load_state_dict(optimizer)
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

    # --- inference copies (Requantize) --------------------------------------------------------
    def refresh_copies(self, s: RequantizeSettings, cache_dequantized: bool = True) -> InferenceCopies:
        """Merge the sampling adapter into the full-precision and low-precision copies."""
        start = time.perf_counter()
        if self.copies is None:
            regen = make_inference_copy(self.policy, SAMPLING)
            explorer, choice_name, reason, report = None, "none", "full precision only", {}
            if s.backend != "none":
                explorer = make_inference_copy(self.policy, SAMPLING)
                qc = QuantConfig.for_family(self.policy.family, None if s.min_dim < 0 else s.min_dim,
                                            weight_tile=s.tile, cache_dequantized=cache_dequantized)
                rep = quantize_model(explorer, qc, backend=s.backend)
                choice_name, reason, report = rep.backend, rep.backend_reason, rep.to_dict()
                if dp.is_main():
                    atomic_write_text(self.run_dir / "quant_report.json", json.dumps(report, indent=1) + "\n")
                log.info("explorer: %s", rep.summary())
            self.copies = InferenceCopies(regen, explorer, choice_name, reason, report)
        elif self.copies_iteration != self.iteration:
            regen, explorer = self.copies.regenerator, self.copies.explorer
            if explorer is not None and is_full_finetune(self.policy.transformer):
                refresh_inference_copy(regen, self.policy, SAMPLING)
                requantize_model(explorer, regen)
            else:  # LoRA: one merge refreshes both copies; the explorer re-quantizes only those layers
                refresh_inference_copy([c for c in (regen, explorer) if c is not None], self.policy, SAMPLING)
        self.copies_iteration = self.iteration
        self.pending["time_requantize"] = time.perf_counter() - start
        self.pending["quant_backend"] = self.copies.backend
        return self.copies

    def inference_model(self, precision: str) -> nn.Module:
        if self.copies is None or self.copies_iteration != self.iteration:
            raise RuntimeError("the inference copies are stale: run Requantize at the start of each iteration")
        if precision == "low":
            if self.copies.explorer is None:
                raise RuntimeError("Requantize ran with backend 'none': there is no low-precision explorer")
            return self.copies.explorer
        return self.copies.regenerator

    # --- optimizer ------------------------------------------------------------------------
    def make_optimizer(self, settings: dict[str, Any]) -> torch.optim.Optimizer:
        from ..models.lora import trainable_parameters

        params = trainable_parameters(self.policy.transformer, TRAINED)
        self.optimizer = torch.optim.AdamW(params, lr=settings["lr"], betas=tuple(settings["betas"]),
                                           weight_decay=settings["weight_decay"], eps=settings["eps"])
        self.optimizer_settings = dict(settings)
        return self.optimizer

    def get_optimizer(self, settings: dict[str, Any]) -> torch.optim.Optimizer:
        if self.optimizer is None:
            return self.make_optimizer(settings)
        for group in self.optimizer.param_groups:  # hyper-parameters edited between queues apply
            group["lr"], group["weight_decay"] = settings["lr"], settings["weight_decay"]
            group["betas"], group["eps"] = tuple(settings["betas"]), settings["eps"]
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
                            self.optimizer.state_dict() if self.optimizer is not None else None, meta)
        metrics_log(self.run_dir).append(row)
        dp.barrier()
        for ref in self._batches:
            batch = ref()
            if batch is not None:
                batch.release()
        self._batches = []


def _strip(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


_SESSIONS: dict[str, TrainingSession] = {}


def open_session(run_dir: Path, policy: FlowPolicy, prompts: list[str], config: SessionConfig,
                 mode: str = "continue") -> TrainingSession:
    """The session of a run directory: reused in-process when nothing changed (ComfyUI re-queue),
    else resumed from its latest checkpoint ("continue") or started afresh ("new")."""
    key = str(Path(run_dir).resolve())
    live = _SESSIONS.get(key)
    if (mode == "continue" and live is not None and live.policy is policy and live.config == config
            and live.prompt_set == prompts):
        return live
    session = TrainingSession(run_dir, policy, prompts, config, resume=(mode == "continue"))
    _SESSIONS[key] = session
    return session
