"""The NFT Update's optimizer: AdamW (torch) or torchao's 8-bit AdamW, and their checkpointable state.

AdamW keeps two fp32 moments per trained weight (8 bytes); torchao's AdamW8bit keeps them as 8-bit
codes with one fp32 scale per block of 256 (about 2 bytes) for tensors of at least 4096 elements
(smaller ones stay fp32, as in bitsandbytes). torchao is an optional extra, imported only when asked
for. Its 8-bit moments are tensor subclasses; checkpoints store their codes and scales as plain
tensors, so a resumed run continues from exactly the same state.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..runtime.extras import missing_extra
from .settings import OPTIMIZERS


class OptimizerUnavailableError(ImportError):
    """The optimizer asked for needs a package that is not installed (one line: which, how to install)."""


def missing_package(kind: str) -> str | None:
    """The one-line error for an optimizer whose package is not installed, or None (cheap: no import)."""
    return missing_extra("adamw8bit", "the 8-bit AdamW") if kind == "adamw8bit" else None


def _adamw8bit():
    problem = missing_package("adamw8bit")
    if problem:
        raise OptimizerUnavailableError(problem)
    from torchao.optim import AdamW8bit

    return AdamW8bit


def build_optimizer(params: Iterable[Tensor], settings: dict[str, Any]) -> torch.optim.Optimizer:
    """settings: lr, betas, weight_decay, eps and kind ("adamw" or "adamw8bit")."""
    kind = settings.get("kind", "adamw")
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}: use one of {', '.join(OPTIMIZERS)}")
    cls = torch.optim.AdamW if kind == "adamw" else _adamw8bit()
    return cls(list(params), lr=settings["lr"], betas=tuple(settings["betas"]),
               weight_decay=settings["weight_decay"], eps=settings["eps"])


def set_hyperparameters(optimizer: torch.optim.Optimizer, settings: dict[str, Any]) -> None:
    """Apply edited hyper-parameters (torchao keeps lr as a tensor, to be filled, not replaced)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(settings["lr"])
        else:
            group["lr"] = settings["lr"]
        group["weight_decay"], group["betas"], group["eps"] = settings["weight_decay"], tuple(settings["betas"]), \
            settings["eps"]


def _is_8bit(value: Any) -> bool:
    return type(value).__name__ == "OptimState8bit" and hasattr(value, "codes")


def portable_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with plain tensors and numbers only: an 8-bit moment becomes
    "<name>.codes" (uint8), "<name>.scale" (fp32 per block) and "<name>.signed"; a tensor lr a float."""
    state = optimizer.state_dict()
    plain: dict[int, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        plain[idx] = {}
        for key, value in entry.items():
            if _is_8bit(value):
                plain[idx].update({f"{key}.codes": value.codes, f"{key}.scale": value.scale,
                                   f"{key}.signed": bool(value.signed)})
            else:
                plain[idx][key] = value
    groups = [{k: (v.item() if isinstance(v, Tensor) else v) for k, v in g.items()} for g in state["param_groups"]]
    return {"state": plain, "param_groups": groups}


def load_portable_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `portable_state`, into an optimizer of the same kind and parameters."""
    entries: dict[int, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        entries[idx] = {k: v for k, v in entry.items() if not k.endswith((".codes", ".scale", ".signed"))}
        for key in {k.rsplit(".", 1)[0] for k in entry if k.endswith(".codes")}:
            from torchao.optim.subclass_8bit import OptimState8bit

            signed = bool(entry[f"{key}.signed"])
            template = OptimState8bit.zeros((256,), signed, 256)  # its qmap: the code book of that sign
            entries[idx][key] = OptimState8bit(entry[f"{key}.codes"], entry[f"{key}.scale"], template.qmap, signed,
                                               dtype=torch.float32)
    lrs = [g["lr"] for g in optimizer.param_groups]
    optimizer.load_state_dict({"state": entries, "param_groups": state["param_groups"]})
    for group, lr in zip(optimizer.param_groups, lrs):
        if isinstance(lr, Tensor):  # torchao steps with a tensor lr
            group["lr"] = lr.fill_(group["lr"])


def kind_of(optimizer: torch.optim.Optimizer) -> str:
    return "adamw" if isinstance(optimizer, torch.optim.AdamW) else "adamw8bit"


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's per-parameter state holds (8-bit moments: codes + scales + code book)."""
    total = 0
    for entry in optimizer.state.values():
        for value in entry.values():
            parts = (value.codes, value.scale, value.qmap) if _is_8bit(value) else \
                (value,) if isinstance(value, Tensor) else ()
            total += sum(t.numel() * t.element_size() for t in parts)
    return total
