"""Workflow files in ComfyUI's two formats.

API format: ``{id: {"class_type": ..., "inputs": {name: value | [src_id, slot]}, "_meta": {"title"}}}``.
UI format (litegraph): ``nodes`` with positional ``widgets_values`` and ``links``; widget values are
mapped to names by our op specs, as ComfyUI's frontend does with its node definitions.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..ops.registry import get_op
from ..ops.spec import OpSpec
from .errors import WorkflowError

MODE_MUTED, MODE_BYPASSED = 2, 4
SEED_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# Nodes that exist only in the editor; the frontend resolves them before queueing.
FRONTEND_ONLY = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")

ApiGraph = dict[str, dict[str, Any]]


def is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _reject_constant(token: str) -> float:
    raise ValueError(f"{token} is not a valid JSON number")


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON objects keep the last of two equal keys; a workflow that has them is refused instead."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_json(path: str | Path) -> Any:
    """Parse a workflow file; every failure is a one-line WorkflowError naming the file."""
    path = Path(path)
    label = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkflowError("file not found", source=label) from None
    except (OSError, UnicodeDecodeError) as e:
        raise WorkflowError(f"cannot read file ({e.__class__.__name__}: {e})", source=label) from None
    if not text.strip():
        raise WorkflowError("the file is empty; expected a workflow in ComfyUI API or UI format", source=label)
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise WorkflowError(f"the key {e.args[0]!r} appears twice in one object (a node id or an input "
                            "given twice); keep one", source=label) from None
    except json.JSONDecodeError as e:
        raise WorkflowError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", source=label) from None
    except ValueError as e:  # NaN / Infinity literals
        raise WorkflowError(f"invalid JSON: {e}", source=label) from None


def detect_format(data: Any, source: str = "workflow") -> str:
    if not isinstance(data, dict):
        raise WorkflowError(f"expected a JSON object at the top level, got {type(data).__name__}", source=source)
    if isinstance(data.get("nodes"), list):
        return "ui"
    if data and all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return "api"
    if not data:
        raise WorkflowError("the workflow has no nodes", source=source)
    bad = next(k for k, v in data.items() if not (isinstance(v, dict) and "class_type" in v))
    raise WorkflowError(
        f"not a ComfyUI workflow: entry {bad!r} has no class_type (API format) and there is no "
        f"'nodes' list (UI format)", source=source)


def load_workflow(path: str | Path) -> tuple[ApiGraph, str]:
    """Read a file in either format; returns the API-format graph and the format it was in."""
    data = read_json(path)
    fmt = detect_format(data, str(path))
    if fmt == "ui":
        return ui_to_api(data, source=str(path)), fmt
    return data, fmt


# --- UI -> API ----------------------------------------------------------------------------

def _node_label(node: dict) -> dict[str, Any]:
    return {"node_id": str(node.get("id")), "title": node.get("title"), "class_type": node.get("type")}


def _widget_values_by_name(node: dict, spec: OpSpec, source: str) -> dict[str, Any]:
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):  # some frontends save named widget values
        return {k: v for k, v in values.items() if spec.input(k) is not None}
    if not isinstance(values, list):
        raise WorkflowError("widgets_values must be a list", source=source, **_node_label(node))
    named: dict[str, Any] = {}
    pos = 0
    for widget in spec.widgets:
        if pos >= len(values):
            break
        named[widget.name] = values[pos]
        pos += 1
        # A seed widget is followed by its "control_after_generate" choice in the saved file.
        if widget.seed and pos < len(values) and values[pos] in SEED_CONTROL_VALUES:
            pos += 1
    if pos < len(values):
        raise WorkflowError(
            f"has {len(values)} widget values but {spec.id} declares {len(spec.widgets)} widgets "
            f"({', '.join(w.name for w in spec.widgets) or 'none'})", source=source, **_node_label(node))
    return named


def ui_to_api(ui: dict, source: str = "workflow") -> ApiGraph:
    nodes = ui.get("nodes")
    if not isinstance(nodes, list):
        raise WorkflowError("UI-format workflow has no 'nodes' list", source=source)
    by_id: dict[str, dict] = {}
    for node in nodes:
        if not isinstance(node, dict) or "id" not in node or not isinstance(node.get("type"), str):
            raise WorkflowError("every entry of 'nodes' needs an 'id' and a 'type'", source=source)
        nid = str(node["id"])
        if nid in by_id:
            both = " and ".join(n["type"] + (f" {n['title']!r}" if n.get("title") else "") for n in (by_id[nid], node))
            raise WorkflowError(f"two nodes have this id ({both}); node ids must be unique", source=source,
                                node_id=nid)
        by_id[nid] = node
    links: dict[int, tuple[str, int]] = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):  # newer frontends may store links as objects
            link = [link.get("id"), link.get("origin_id"), link.get("origin_slot"), link.get("target_id"),
                    link.get("target_slot"), link.get("type")]
        if not isinstance(link, list) or len(link) < 5:
            raise WorkflowError(f"malformed link {link!r}", source=source)
        links[link[0]] = (str(link[1]), link[2])

    def origin(link_id: int, seen: tuple = ()) -> tuple[str, int] | Any | None:
        """Follow a link back through reroutes, bypassed nodes and primitives to a real output."""
        if link_id not in links:
            return None
        src_id, slot = links[link_id]
        src = by_id.get(src_id)
        if src is None or src_id in seen:
            return (src_id, slot)
        kind, mode = src.get("type"), src.get("mode", 0)
        if kind == "Reroute":
            ins = src.get("inputs") or [{}]
            return origin(ins[0].get("link"), (*seen, src_id))
        if kind == "PrimitiveNode":
            vals = src.get("widgets_values") or [None]
            return _Literal(vals[0])
        if mode == MODE_BYPASSED:
            outs = src.get("outputs") or []
            src_spec = get_op(kind)
            out_type = (outs[slot].get("type") if slot < len(outs) else
                        src_spec.outputs[slot].type if src_spec and slot < len(src_spec.outputs) else None)
            for inp in src.get("inputs") or []:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return origin(inp["link"], (*seen, src_id))
            return None
        if mode == MODE_MUTED:
            return None
        return (src_id, slot)

    api: ApiGraph = {}
    for nid, node in by_id.items():
        kind, mode = node["type"], node.get("mode", 0)
        if kind in FRONTEND_ONLY or mode in (MODE_MUTED, MODE_BYPASSED):
            continue
        spec = get_op(kind)
        inputs: dict[str, Any] = {}
        if spec is not None:
            inputs.update(_widget_values_by_name(node, spec, source))
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            resolved = origin(inp["link"])
            if isinstance(resolved, _Literal):
                inputs[inp["name"]] = resolved.value
            elif resolved is not None:
                inputs[inp["name"]] = [resolved[0], int(resolved[1])]
            # else: the source is muted (or bypassed with no pass-through), so the input stays
            # unconnected; a widget input keeps its saved value, a socket is reported as missing.
        entry: dict[str, Any] = {"class_type": kind, "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        api[nid] = entry
    return api


class _Literal:
    def __init__(self, value: Any):
        self.value = value


# --- API -> UI ----------------------------------------------------------------------------

def _depths(api: ApiGraph) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(nid: str, stack: frozenset = frozenset()) -> int:
        if nid in depth:
            return depth[nid]
        if nid in stack or nid not in api:
            return 0
        srcs = [v[0] for v in api[nid].get("inputs", {}).values() if is_link(v)]
        depth[nid] = 1 + max((visit(s, stack | {nid}) for s in srcs), default=-1)
        return depth[nid]

    for nid in api:
        visit(nid)
    return depth


def _sort_key(nid: str) -> tuple:
    return (0, int(nid), "") if nid.isdigit() else (1, 0, nid)


def api_to_ui(api: ApiGraph, notes: dict[str, str] | None = None) -> dict[str, Any]:
    """Write an API graph as a UI-format workflow, laid out left to right by dependency depth.

    Node ids must be integers (UI format requires it). `notes` adds Note nodes (title -> text)
    above the graph, e.g. a short explanation of what the workflow does.
    """
    ids = sorted(api, key=_sort_key)
    for nid in ids:
        if not nid.isdigit():
            raise WorkflowError("UI format needs integer node ids", node_id=nid)
    depth = _depths(api)
    column_rows: dict[int, int] = defaultdict(int)
    consumers: dict[tuple[str, int], list[int]] = defaultdict(list)
    links: list[list[Any]] = []
    ui_nodes: list[dict[str, Any]] = []
    node_inputs: dict[str, list[dict]] = {}

    for nid in ids:
        entry = api[nid]
        spec = get_op(entry["class_type"])
        if spec is None:
            raise WorkflowError("unknown node type", node_id=nid, class_type=entry["class_type"])
        ins, widgets = [], []
        for inp in spec.inputs:
            value = entry.get("inputs", {}).get(inp.name, inp.default)
            linked = is_link(value)
            if inp.is_widget:
                widgets.append(inp.default if linked else value)
                if inp.seed:
                    widgets.append("fixed")
            if linked:
                links.append([len(links) + 1, int(value[0]), value[1], int(nid), len(ins), inp.type])
                consumers[(value[0], value[1])].append(len(links))
            elif not inp.is_widget and value is not None:
                raise WorkflowError("UI format cannot hold a literal for a socket input; feed it from a node",
                                    node_id=nid, class_type=spec.id, input_name=inp.name)
            if linked or not inp.is_widget:
                slot = {"name": inp.name, "type": inp.type, "link": links[-1][0] if linked else None}
                if inp.is_widget:
                    slot["widget"] = {"name": inp.name}
                ins.append(slot)
        node_inputs[nid] = ins
        col = depth.get(nid, 0)
        row = column_rows[col]
        column_rows[col] += 1
        height = 60 + 26 * (len(widgets) + max(len(ins), len(spec.outputs)))
        ui_node: dict[str, Any] = {
            "id": int(nid), "type": spec.id, "pos": [40 + 360 * col, 160 + 300 * row], "size": [320, height],
            "flags": {}, "order": 0, "mode": 0, "inputs": ins, "outputs": [],
            "properties": {"Node name for S&R": spec.id}, "widgets_values": widgets,
        }
        title = entry.get("_meta", {}).get("title")
        if title and title != spec.display_name:
            ui_node["title"] = title
        ui_nodes.append(ui_node)

    for ui_node in ui_nodes:
        spec = get_op(ui_node["type"])
        ui_node["outputs"] = [
            {"name": o.name, "type": o.type, "links": consumers.get((str(ui_node["id"]), k)) or [], "slot_index": k}
            for k, o in enumerate(spec.outputs)]
    order = sorted(ui_nodes, key=lambda n: (depth.get(str(n["id"]), 0), n["id"]))
    for k, ui_node in enumerate(order):
        ui_node["order"] = k

    next_id = max((int(i) for i in ids), default=0) + 1
    for k, (title, text) in enumerate((notes or {}).items()):
        ui_nodes.append({"id": next_id + k, "type": "Note", "title": title, "pos": [40 + 420 * k, -120],
                         "size": [400, 220], "flags": {}, "order": len(ui_nodes), "mode": 0,
                         "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text]})
    return {
        "last_node_id": max((n["id"] for n in ui_nodes), default=0),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": 0.4,
    }


def dump_json(data: Any) -> str:
    def check(v: Any) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"cannot write non-finite number {v!r} to a workflow")

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        else:
            check(v)

    walk(data)
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
