"""What a running op may ask of its host: run directory, progress, interruption, model folders.

The headless engine and the ComfyUI adapter each install their own `RunContext`, so ops are
written once and never import either host.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .metrics import metrics_log

log = logging.getLogger("solrl")

# Host folder kinds (ComfyUI's names) searched for policies and for reward weights; hosts fill
# RunContext.search_dirs under these keys. ComfyUI's "text_encoders" also covers models/clip.
MODEL_FOLDER_KINDS = ("diffusers", "checkpoints", "diffusion_models")
REWARD_FOLDER_KINDS = ("solrl_rewards", "text_encoders", "clip")


class Interrupted(Exception):
    """Raised at a safe point after the user asked to stop (Ctrl-C, ComfyUI's Cancel)."""


class ProgressBar(Protocol):
    def update(self, done: int, total: int | None = None, preview: Any = None) -> None: ...

    def close(self) -> None: ...


class _NullBar:
    def update(self, done: int, total: int | None = None, preview: Any = None) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class RunContext:
    run_dir: Path | None = None  # fixed by the host (CLI --run-dir); else ops use runs_root / <run name>
    runs_root: Path = Path("runs")
    # Extra folders to look for model / reward files in, by kind ("checkpoints", "solrl_rewards").
    search_dirs: dict[str, list[str]] = field(default_factory=dict)
    interrupt_event: threading.Event = field(default_factory=threading.Event)

    # --- interruption -------------------------------------------------------------------
    def check_interrupt(self) -> None:
        if self.interrupt_event.is_set():
            raise Interrupted("interrupted")

    # --- progress (hosts override) ------------------------------------------------------
    def progress(self, total: int, desc: str = "") -> ProgressBar:
        return _NullBar()

    def on_node_start(self, node_id: str, title: str) -> None:
        pass

    def on_loop_iteration(self, loop_id: str, index: int, total: int) -> None:
        pass

    def status(self, text: str) -> None:
        log.info(text)

    def show_image(self, image: Any, name: str) -> dict[str, str] | None:
        """Make an image visible in the host's UI; returns the host's reference to it (or None)."""
        return None

    # --- run directory ------------------------------------------------------------------
    def require_run_dir(self) -> Path:
        if self.run_dir is None:
            raise RuntimeError("this op needs a run directory, but the host gave none")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return self.run_dir

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one row to the run's metrics log (metrics.jsonl and its sinks)."""
        metrics_log(self.require_run_dir()).append(row)


_current: contextvars.ContextVar[RunContext] = contextvars.ContextVar("solrl_run_context")
_default = RunContext()


def current_context() -> RunContext:
    return _current.get(_default)


@contextlib.contextmanager
def use_context(ctx: RunContext) -> Iterator[RunContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
