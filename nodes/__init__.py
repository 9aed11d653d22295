"""ComfyUI node classes, generated from the op specs in solrl_core/ops (one definition per node)."""
from __future__ import annotations

from ..solrl_core.ops.registry import all_ops
from .generate import node_class
from .host import register_reward_folder

register_reward_folder()

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _spec in all_ops().values():
    NODE_CLASS_MAPPINGS[_spec.id] = node_class(_spec)
    NODE_DISPLAY_NAME_MAPPINGS[_spec.id] = f"{_spec.display_name} (Sol-RL)"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
