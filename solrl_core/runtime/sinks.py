"""Other places a run's metrics go: TensorBoard event files and Weights & Biases runs (optional
extras `tensorboard` and `wandb`), both inside the run directory and without network.

A sink receives every row the run's metrics log appends (runtime.metrics) and the images the run
shows (the preview grids). Rows of an iteration are logged at step = iteration, Log Metric rows at
their step (or in order when they have none).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .distributed import is_main
from .extras import extra_import_error, missing_extra
from .metrics import MetricsLog

TENSORBOARD_DIR = "tensorboard"
# Training Run's `log_to`: metrics.jsonl is always written; the others add sinks.
LOG_TO = ("metrics.jsonl", "tensorboard", "wandb", "tensorboard+wandb")


def scalars_of(row: dict[str, Any]) -> tuple[dict[str, float], int | None]:
    """The numbers a row carries, by tag, and its step (None: no step of its own)."""
    if "metric" in row:  # a Log Metric row: {"metric": name, "value": v, "step"?: s}
        return {row["metric"]: row["value"]}, row.get("step")
    numbers = {k: float(v) for k, v in row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
    return numbers, row.get("iteration")


class TensorBoardSink:
    """Scalars of every metrics row and the preview images, as event files in <run dir>/tensorboard."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any] | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise extra_import_error("tensorboard", "log_to tensorboard", e) from e
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
        if config:
            self.writer.add_text("config", json.dumps(config, sort_keys=True))
        self._rows = 0

    def write(self, row: dict[str, Any]) -> None:
        scalars, step = scalars_of(row)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, self._rows if step is None else step)
        self._rows += 1
        self.writer.flush()

    def image(self, tag: str, image: Any, step: int) -> None:
        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Every metrics row and the preview images as a Weights & Biases run in <run dir>/wandb, offline
    unless WANDB_MODE says otherwise (`wandb sync <run dir>/wandb/offline-run-*` uploads it later).

    Charts use `iteration` as their x axis; wandb's own step just counts the rows, so rows without
    an iteration (Log Metric) never push it past the next iteration's."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any] | None = None):
        try:
            import wandb
        except ImportError as e:
            raise extra_import_error("wandb", "log_to wandb", e) from e
        run_dir = Path(run_dir)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, reinit="create_new")
        self._wandb = wandb
        self.run = wandb.init(dir=str(run_dir), project="solrl", name=run_dir.name, group=run_dir.name,
                              config=config or {}, mode=os.environ.get("WANDB_MODE", "offline"),
                              settings=settings)
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")

    def write(self, row: dict[str, Any]) -> None:
        scalars, step = scalars_of(row)
        self.run.log({**scalars, **({"iteration": step} if step is not None else {})})

    def image(self, tag: str, image: Any, step: int) -> None:
        self.run.log({tag: self._wandb.Image(image.convert("RGB")), "iteration": step})

    def close(self) -> None:
        self.run.finish()


SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}  # each needs the package of its name


def sinks_of(log_to: str) -> list[str]:
    """The sinks a `log_to` value asks for (metrics.jsonl itself is always written)."""
    return [kind for kind in log_to.split("+") if kind in SINKS]


def check_sinks(log_to: str) -> None:
    """Before any compute: every sink asked for can be made (its package is installed)."""
    for kind in sinks_of(log_to):
        problem = missing_extra(kind, f"log_to {kind}")
        if problem:
            raise ImportError(problem)


def attach_sinks(log: MetricsLog, log_to: str, config: dict[str, Any] | None = None) -> None:
    """Add the sinks `log_to` asks for to a run's metrics log, once per process (main process only)."""
    for kind in sinks_of(log_to) if is_main() else ():
        if not log.has_sink(SINKS[kind]):
            log.add_sink(SINKS[kind](log.path.parent, config))
