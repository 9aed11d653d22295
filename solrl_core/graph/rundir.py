"""The run directory: resolved workflow, manifest, metrics, log. Files are written atomically."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .workflow import ApiGraph, dump_json

MANIFEST_PACKAGES = ("torch", "diffusers", "transformers", "peft", "safetensors", "open-clip-torch", "numpy",
                     "solrl")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target:
    a crash leaves either the old file or the new one, never half of one."""
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


def default_run_dir(workflow_path: str | Path, root: str | Path = "runs") -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{Path(workflow_path).stem}-{stamp}"


def check_writable(run_dir: Path) -> None:
    """Fail before compute when the run directory cannot be created or written."""
    probe_parent = run_dir
    while not probe_parent.exists():
        probe_parent = probe_parent.parent
    if not probe_parent.is_dir() or not os.access(probe_parent, os.W_OK | os.X_OK):
        raise PermissionError(f"run directory {run_dir} is not writable ({probe_parent} is not a writable folder)")


def _versions() -> dict[str, str]:
    out = {}
    for name in MANIFEST_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def seeds_of(api: ApiGraph) -> dict[str, Any]:
    """Every input named like a seed, by node: what a reader needs to reproduce the run."""
    return {f"{nid}.{k}": v for nid, e in api.items() for k, v in e.get("inputs", {}).items()
            if "seed" in k and not isinstance(v, list)}


def manifest(api: ApiGraph, workflow_path: str, argv: list[str]) -> dict[str, Any]:
    return {
        "workflow": str(workflow_path),
        "command": argv,
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "packages": _versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "seeds": seeds_of(api),
        "git_commit": _git_commit(),
    }


def write_run_header(run_dir: Path, api: ApiGraph, workflow_path: str, argv: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "workflow_api.json", dump_json(api))
    atomic_write_text(run_dir / "manifest.json", json.dumps(manifest(api, workflow_path, argv), indent=2) + "\n")
