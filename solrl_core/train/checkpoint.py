"""Run-state checkpoints: written to a temporary folder, fsynced, renamed, then `latest` flips.

A SIGKILL at any moment leaves either the previous checkpoint or the new one as `latest`, never a
half-written one. Tensors go to safetensors; scalars and lists to JSON. A `latest` that names a
missing or broken checkpoint is refused, never taken for "nothing to resume".
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..runtime.files import atomic_write_text, fsync_dir

CHECKPOINTS = "checkpoints"
LATEST = "latest"
KEEP = 2
STATE_KEYS = ("config", "iteration", "cursor", "metrics")


class CheckpointError(ValueError):
    """A run directory whose saved state cannot be resumed as it is; the message says what to do."""


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, iteration: int, tensors: dict[str, torch.Tensor],
                    optimizer: dict | None, meta: dict[str, Any]) -> Path:
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter-{iteration:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "weights.safetensors")
    meta = dict(meta)
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = flatten_optimizer(optimizer)
        save_file({k: v.cpu() for k, v in opt_tensors.items()}, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST, name + "\n")
    for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter-"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _saved(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("iter-*") if p.is_dir()) if root.is_dir() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, checked whole; None when the run has saved none yet.

    Reads only. Raises CheckpointError when `latest` names a missing or broken checkpoint, or when
    checkpoints are there but no pointer names them (only a first save killed before its pointer
    leaves one): resuming from there would silently start the run over.
    """
    root = run_dir / CHECKPOINTS
    pointer, saved = root / LATEST, _saved(root)
    if not pointer.exists():
        if any(name != "iter-000001" for name in saved):
            raise CheckpointError(f"{root} holds {', '.join(saved)} but no '{LATEST}' file naming the one to "
                                  f"resume: write that name into {pointer}, or choose mode 'new' to start over")
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    problem = checkpoint_problem(root / name) if name in saved else "does not exist"
    if problem:
        others = [n for n in saved if n != name and not checkpoint_problem(root / n)]
        fix = f"write {' or '.join(others)} into it" if others else "restore that checkpoint"
        raise CheckpointError(f"{pointer} names the checkpoint {name!r}, which {problem}: {fix}, or choose mode "
                              "'new' to start over")
    return root / name


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json (config, iteration, cursor, metrics, optimizer settings)."""
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError("has no state.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"has an unreadable state.json ({e.__class__.__name__}: {e})") from None
    missing = [k for k in STATE_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"has a state.json without {', '.join(missing)}")
    return meta


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None: it can). Reads the state and the tensor
    files' headers only, so it is cheap enough to run at validation."""
    try:
        meta = read_state(path)
    except CheckpointError as e:
        return str(e)
    for name in ("weights.safetensors", *(("optimizer.safetensors",) if "optimizer" in meta else ())):
        try:
            with safe_open(str(path / name), "pt"):
                pass
        except (OSError, SafetensorError) as e:
            return f"has an unreadable {name} ({' '.join(str(e).split())})"
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None, dict[str, Any]]:
    meta = read_state(path)
    tensors = load_file(path / "weights.safetensors")
    optimizer = None
    if "optimizer" in meta:
        optimizer = unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta.pop("optimizer"))
    return tensors, optimizer, meta
