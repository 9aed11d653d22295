"""The run directory's header: the resolved workflow and the manifest (written atomically)."""
from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..runtime.files import atomic_write_text
from ..train.settings import MEMORY_SETTINGS
from .workflow import ApiGraph, dump_json

MANIFEST_PACKAGES = ("torch", "diffusers", "transformers", "peft", "safetensors", "open-clip-torch", "numpy",
                     "solrl")


def default_run_dir(workflow_path: str | Path, root: str | Path = "runs") -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{Path(workflow_path).stem}-{stamp}"


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


def memory_settings_of(api: ApiGraph) -> dict[str, Any]:
    """The settings that trade time for memory, by node (train.settings.MEMORY_SETTINGS)."""
    return {f"{nid}.{k}": v for nid, e in api.items() for k, v in e.get("inputs", {}).items()
            if k in MEMORY_SETTINGS and not isinstance(v, list)}


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
        "memory": memory_settings_of(api),
        "git_commit": _git_commit(),
    }


def write_run_header(run_dir: Path, api: ApiGraph, workflow_path: str, argv: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "workflow_api.json", dump_json(api))
    atomic_write_text(run_dir / "manifest.json", json.dumps(manifest(api, workflow_path, argv), indent=2) + "\n")
