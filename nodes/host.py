"""The RunContext ops see inside ComfyUI: its progress bars, interruption and folders.

ComfyUI modules are imported here only, lazily, so the pack imports without ComfyUI (tests).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..solrl_core.graph.context import RunContext


class _ComfyBar:
    def __init__(self, total: int, node_id: str | None):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.total = total

    def update(self, done: int, total: int | None = None, preview: Any = None) -> None:
        self.total = total or self.total
        self.bar.update_absolute(done, self.total, ("PNG", preview, None) if preview is not None else None)

    def close(self) -> None:
        pass


class ComfyContext(RunContext):
    def __init__(self, node_id: str | None, **kw: Any):
        super().__init__(**kw)
        self.node_id = node_id

    def check_interrupt(self) -> None:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()

    def progress(self, total: int, desc: str = ""):
        return _ComfyBar(total, self.node_id)


def comfy_context(node_id: str | None) -> RunContext:
    try:
        import folder_paths
    except ImportError:  # imported outside ComfyUI (tests, tools): plain context
        return RunContext()
    search = {}
    for kind in ("diffusers", "checkpoints", "diffusion_models", "clip", "loras", "solrl_rewards"):
        try:
            search[kind] = list(folder_paths.get_folder_paths(kind))
        except Exception:  # a kind this ComfyUI version does not know
            search[kind] = []
    runs_root = Path(folder_paths.get_output_directory()) / "solrl_runs"
    return ComfyContext(node_id, search_dirs=search, runs_root=runs_root)
