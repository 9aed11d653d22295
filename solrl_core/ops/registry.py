"""The op registry: every node the engine and the ComfyUI pack know, by id."""
from __future__ import annotations

import importlib

from .spec import OpSpec

_OPS: dict[str, OpSpec] = {}

# Op modules, imported on first use so `import solrl_core` stays light.
_OP_MODULES = ("flow", "utility", "training", "outputs")
_loaded = False


def register(spec: OpSpec) -> OpSpec:
    if spec.id in _OPS and _OPS[spec.id] is not spec:
        raise ValueError(f"op id {spec.id!r} is registered twice")
    if not spec.id.startswith("SolRL"):
        raise ValueError(f"op id {spec.id!r} must start with 'SolRL'")
    _OPS[spec.id] = spec
    return spec


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in _OP_MODULES:
            importlib.import_module(f"{__package__}.{name}")


def all_ops() -> dict[str, OpSpec]:
    _load()
    return dict(_OPS)


def get_op(op_id: str) -> OpSpec | None:
    _load()
    return _OPS.get(op_id)
