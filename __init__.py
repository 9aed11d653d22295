"""Sol-RL ComfyUI node pack: FP4 explore, BF16 train (RL post-training of text-to-image models).

ComfyUI imports this folder from custom_nodes/. Everything is generated from solrl_core's op specs.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
