"""Run-state checkpoints: written to a temporary folder, fsynced, renamed, then `latest` flips.

A SIGKILL at any moment leaves either the previous checkpoint or the new one as `latest`, never a
half-written one. Tensors go to safetensors; scalars and lists to JSON.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..runtime.files import atomic_write_text, fsync_dir

CHECKPOINTS = "checkpoints"
LATEST = "latest"
KEEP = 2


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


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    path = run_dir / CHECKPOINTS / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None, dict[str, Any]]:
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    tensors = load_file(path / "weights.safetensors")
    optimizer = None
    if "optimizer" in meta:
        optimizer = unflatten_optimizer(load_file(path / "optimizer.safetensors"), meta.pop("optimizer"))
    return tensors, optimizer, meta
