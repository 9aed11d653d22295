"""Build a ComfyUI V1 node class from an OpSpec."""
from __future__ import annotations

from typing import Any

import torch

from ..solrl_core.ops.spec import ANY, Input, InputError, OpSpec
from ..solrl_core.runtime.context import use_context
from .host import comfy_context, list_models


class AnyType(str):
    """ComfyUI compares socket types with `!=`; this type matches every other type."""

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = str.__hash__


ANY_TYPE = AnyType(ANY)


def comfy_type(type_name: str) -> str:
    return ANY_TYPE if type_name == ANY else type_name


def input_entry(inp: Input) -> tuple:
    """The (type, options) pair ComfyUI's INPUT_TYPES expects for one input."""
    opts: dict[str, Any] = {}
    if inp.tooltip:
        opts["tooltip"] = inp.tooltip
    if inp.type == "COMBO":
        if inp.default is not None:
            opts["default"] = inp.default
        choices = list(inp.choices)
        if inp.choices_from:  # listed when ComfyUI asks (/object_info), so new models show up
            choices += [m for m in list_models(inp.choices_from) if m not in choices]
        return (choices, opts)
    if inp.is_widget:
        if inp.default is not None:
            opts["default"] = inp.default
        for key in ("min", "max", "step"):
            if getattr(inp, key) is not None:
                opts[key] = getattr(inp, key)
        if inp.type == "STRING" and inp.multiline:
            opts["multiline"] = True
        if inp.seed:
            opts["control_after_generate"] = True
    return (comfy_type(inp.type), opts)


def node_class(spec: OpSpec) -> type:
    hidden = {"dynprompt": "DYNPROMPT", "unique_id": "UNIQUE_ID"}

    def INPUT_TYPES(cls) -> dict:  # noqa: N802 (ComfyUI's name)
        return {"required": {i.name: input_entry(i) for i in spec.inputs if not i.optional},
                "optional": {i.name: input_entry(i) for i in spec.inputs if i.optional},
                "hidden": dict(hidden)}

    def run(self, dynprompt: Any = None, unique_id: str | None = None, **kwargs: Any) -> Any:
        if spec.expands:
            kwargs.update(graph=dynprompt, node_id=unique_id)
        with use_context(comfy_context(unique_id)):
            if spec.trains:  # ComfyUI runs every node under inference_mode
                with torch.inference_mode(False), torch.enable_grad():
                    return spec.function(**kwargs)
            return spec.function(**kwargs)

    attrs: dict[str, Any] = {
        "INPUT_TYPES": classmethod(INPUT_TYPES),
        "RETURN_TYPES": tuple(comfy_type(o.type) for o in spec.outputs),
        "RETURN_NAMES": tuple(o.name for o in spec.outputs),
        "OUTPUT_TOOLTIPS": tuple(o.tooltip for o in spec.outputs),
        "FUNCTION": "run",
        "CATEGORY": spec.category,
        "DESCRIPTION": spec.description,
        "OUTPUT_NODE": spec.output_node,
        "run": run,
        "__doc__": spec.description,
    }
    if spec.always_run:
        # NaN never equals itself, so ComfyUI's cache never serves this node from a previous run. A new
        # float each call: containers compare by identity first, and ComfyUI's cache key holds this value
        # in a frozenset, where the one math.nan object would equal itself (a cache hit every time).
        attrs["IS_CHANGED"] = classmethod(lambda cls, **kw: float("nan"))
    if spec.validate is not None or spec.settings is not None:
        def VALIDATE_INPUTS(cls, **kw: Any) -> bool | str:  # noqa: N802 (ComfyUI's name)
            # ComfyUI skips its own range and list checks for a node that validates with **kw, so the
            # inputs are checked here as the headless engine does. Linked inputs arrive as None.
            literals = {k: v for k, v in kw.items() if k not in hidden and v is not None}
            try:  # in ComfyUI's context: its model folders and output directory
                with use_context(comfy_context(None)):
                    for name, value in list(literals.items()):
                        inp = spec.input(name)
                        if inp is not None and inp.is_widget:
                            literals[name] = inp.check(value)
                    spec.check(literals, {})
            except InputError as e:
                return f"{e.input_name}: {e}"
            except (ValueError, FileNotFoundError) as e:
                return str(e)
            return True
        attrs["VALIDATE_INPUTS"] = classmethod(VALIDATE_INPUTS)
    return type(spec.id, (), attrs)
