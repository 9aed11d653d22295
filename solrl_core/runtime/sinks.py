"""Other places a run's metrics go: TensorBoard event files (optional extra `tensorboard`).

A sink receives every row the run's metrics log appends (runtime.metrics) and the images the run
shows (the preview grids). Rows of an iteration are logged at step = iteration, Log Metric rows at
their step (or in order when they have none).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TENSORBOARD_DIR = "tensorboard"


def scalars_of(row: dict[str, Any]) -> tuple[dict[str, float], int | None]:
    """The numbers a row carries, by tag, and its step (None: no step of its own)."""
    if "metric" in row:  # a Log Metric row: {"metric": name, "value": v, "step"?: s}
        return {row["metric"]: row["value"]}, row.get("step")
    numbers = {k: float(v) for k, v in row.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
    return numbers, row.get("iteration")


class TensorBoardSink:
    """Scalars of every metrics row and the preview images, as event files in <run dir>/tensorboard."""

    def __init__(self, run_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("TensorBoard logging needs the tensorboard package: "
                              "pip install -e \".[tensorboard]\"") from e
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
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
