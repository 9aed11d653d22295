"""The RunContext ops see inside ComfyUI: its progress bars, interruption, text, images, folders.

ComfyUI modules are imported here only, lazily, so the pack imports without ComfyUI (tests).
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

from ..solrl_core.runtime.context import MODEL_FOLDER_KINDS, REWARD_FOLDER_KINDS, RunContext

log = logging.getLogger("solrl")


class _ComfyBar:
    def __init__(self, total: int, node_id: str | None):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.total = total

    def update(self, done: int, total: int | None = None, preview: Any = None) -> None:
        self.total = total or self.total
        self.bar.update_absolute(done, self.total, ("PNG", preview, 512) if preview is not None else None)

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

    def status(self, text: str) -> None:
        log.info(text)
        try:
            from server import PromptServer

            PromptServer.instance.send_progress_text(text, self.node_id)
        except Exception:  # an older ComfyUI without progress text: the log has it
            pass

    def show_image(self, image: Any, name: str) -> dict[str, str] | None:
        import folder_paths

        folder = Path(folder_paths.get_temp_directory()) / "solrl"
        folder.mkdir(parents=True, exist_ok=True)
        filename = f"{Path(name).stem}_{uuid.uuid4().hex[:8]}.png"
        image.save(folder / filename)
        return {"filename": filename, "subfolder": "solrl", "type": "temp"}


def list_models(kind: str) -> list[str]:
    """Model folders (diffusers) and files (checkpoints, diffusion models) in ComfyUI's folders."""
    try:
        import folder_paths
    except ImportError:
        return []
    names: list[str] = []
    for folder in _folders("diffusers"):
        if os.path.isdir(folder):
            names += sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, "model_index.json")))
    for k in ("checkpoints", "diffusion_models"):
        try:
            names += folder_paths.get_filename_list(k)
        except Exception:
            pass
    return names


def _folders(kind: str) -> list[str]:
    try:
        import folder_paths

        return list(folder_paths.get_folder_paths(kind))
    except Exception:  # not inside ComfyUI, or a kind this version does not know
        return []


def register_reward_folder() -> None:
    """Add models/solrl_rewards to ComfyUI's folder registry (HPSv2, PickScore, ... weights)."""
    try:
        import folder_paths
    except ImportError:
        return
    if "solrl_rewards" not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths["solrl_rewards"] = (
            [os.path.join(folder_paths.models_dir, "solrl_rewards")], {""})


def comfy_context(node_id: str | None) -> RunContext:
    try:
        import folder_paths
    except ImportError:  # imported outside ComfyUI (tests, tools): plain context
        return RunContext()
    search = {kind: _folders(kind) for kind in (*MODEL_FOLDER_KINDS, *REWARD_FOLDER_KINDS)}
    runs_root = Path(folder_paths.get_output_directory()) / "solrl_runs"
    return ComfyContext(node_id, search_dirs=search, runs_root=runs_root)
