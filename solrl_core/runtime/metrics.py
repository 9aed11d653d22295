"""A run's metrics log: the one writer of metrics.jsonl, and the way its rows reach other sinks.

Every row of a run goes through `metrics_log(run_dir)`: an iteration's metrics from the training
session, a Log Metric node's value. A row is one JSON object on one line, flushed and fsynced, so a
SIGKILL loses no row already written and leaves at most a torn last line, which the next append cuts
off. Only the main process (process 0 under torch.distributed) writes. Sinks attached to the log (event files
for TensorBoard, Weights & Biases) receive the same rows, and the images the run shows.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from .distributed import is_main
from .files import atomic_write_text

METRICS_FILE = "metrics.jsonl"


class MetricsSink(Protocol):
    """Somewhere else the rows go. `image` receives a PIL image to show at a step."""

    def write(self, row: dict[str, Any]) -> None: ...

    def image(self, tag: str, image: Any, step: int) -> None: ...

    def close(self) -> None: ...


def _line(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True) + "\n"


class MetricsLog:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE
        self.sinks: list[MetricsSink] = []
        self._tail_checked = False

    # --- writing --------------------------------------------------------------------------
    def append(self, row: dict[str, Any]) -> None:
        """Add one row to the file (durably) and hand it to every sink."""
        if not is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_line(row))
            f.flush()
            os.fsync(f.fileno())
        for sink in self.sinks:
            sink.write(row)

    def image(self, tag: str, image: Any, step: int) -> None:
        """Show an image in the sinks that keep images (the file itself holds numbers only)."""
        if is_main():
            for sink in self.sinks:
                sink.image(tag, image, step)

    def restore(self, committed: list[dict[str, Any]], key: str = "iteration") -> None:
        """Make the rows that carry `key` exactly `committed` (a checkpoint's rows, in order), keeping
        every other row where it is: rows of work that never reached its checkpoint are dropped, and
        committed rows that never reached the file (a kill between checkpoint and append) are added."""
        if not is_main():
            return
        rows = self.rows()
        wanted = {r[key] for r in committed}
        kept = [r for r in rows if key not in r or r[key] in wanted]
        present = {r[key] for r in kept if key in r}
        kept += [r for r in committed if r[key] not in present]
        if kept != rows or (self.path.exists() and not self._ends_cleanly()):
            atomic_write_text(self.path, "".join(_line(r) for r in kept))

    # --- reading --------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """Every complete row in file order (a torn last line is not a row)."""
        if not self.path.exists():
            return []
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")[:-1]  # the part after the last newline is empty or torn
        return [json.loads(line) for line in lines if line.strip()]

    # --- sinks ----------------------------------------------------------------------------
    def add_sink(self, sink: MetricsSink) -> None:
        self.sinks.append(sink)

    def has_sink(self, kind: type) -> bool:
        return any(isinstance(s, kind) for s in self.sinks)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def _ends_cleanly(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _cut_torn_tail(self) -> None:
        if self._tail_checked:
            return
        self._tail_checked = True
        if self.path.exists() and not self._ends_cleanly():
            data = self.path.read_bytes()
            os.truncate(self.path, data.rfind(b"\n") + 1)


_LOGS: dict[str, MetricsLog] = {}


def metrics_log(run_dir: str | Path) -> MetricsLog:
    """The log of a run directory: one per directory in a process, so the session's rows and Log
    Metric rows go through the same writer and the same sinks."""
    key = str(Path(run_dir).resolve())
    log = _LOGS.get(key)
    if log is None:
        log = _LOGS[key] = MetricsLog(run_dir)
    return log
