"""Sol-RL ComfyUI node pack: FP4 explore, BF16 train (RL post-training of text-to-image models).

ComfyUI imports this folder from custom_nodes/. Everything is generated from solrl_core's op specs.
"""
# ComfyUI imports the folder as a package. pytest imports this file too (the folder above tests/), as a
# lone module when the checkout's folder name is not an identifier (a clone into sol-rl/): nothing to map.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
