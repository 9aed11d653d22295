"""Files of a run directory: atomic writes (a crash leaves the old file or the new one, never half)
and the checks made before any compute."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_writable(run_dir: Path) -> None:
    """Fail before compute when the run directory cannot be created or written."""
    probe_parent = run_dir
    while not probe_parent.exists():
        probe_parent = probe_parent.parent
    if not probe_parent.is_dir() or not os.access(probe_parent, os.W_OK | os.X_OK):
        raise PermissionError(f"run directory {run_dir} is not writable ({probe_parent} is not a writable folder)")
