"""Validation before any compute: every problem is one WorkflowError naming node and input."""
from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import replace
from typing import Any

from ..ops.registry import get_op
from ..ops.spec import ANY, InputError, OpSpec, types_compatible
from .errors import WorkflowError
from .workflow import ApiGraph, _sort_key, is_link


def title_of(entry: dict) -> str | None:
    meta = entry.get("_meta")
    return meta.get("title") if isinstance(meta, dict) else None


def _err(msg: str, source: str, nid: str, entry: dict, input_name: str | None = None) -> WorkflowError:
    return WorkflowError(msg, source=source, node_id=nid, title=title_of(entry),
                         class_type=entry.get("class_type") if isinstance(entry.get("class_type"), str) else None,
                         input_name=input_name)


def validate(api: Any, source: str = "workflow", skip_checks: Collection[str] = ()) -> ApiGraph:
    """Check a whole API-format graph; returns a normalised copy (defaults filled in).

    Raises the first problem found, visiting nodes in id order so the message is stable.
    `skip_checks`: node types whose own check (files on disk, ...) is left out (the memory plan
    needs configs, not weights).
    """
    if not isinstance(api, dict):
        raise WorkflowError(f"expected a JSON object at the top level, got {type(api).__name__}", source=source)
    if not api:
        raise WorkflowError("the workflow has no nodes", source=source)
    graph: ApiGraph = {}
    specs: dict[str, OpSpec] = {}
    for nid in sorted(api, key=_sort_key):
        entry = api[nid]
        if not isinstance(entry, dict) or not isinstance(entry.get("class_type"), str):
            raise WorkflowError("node has no class_type", source=source, node_id=nid)
        spec = get_op(entry["class_type"])
        if spec is None:
            raise _err("unknown node type; run `python -m solrl_core.run --list-nodes` to see the known ones",
                       source, nid, entry)
        inputs = entry.get("inputs", {})
        if not isinstance(inputs, dict):
            raise _err("'inputs' must be an object", source, nid, entry)
        specs[nid] = spec
        graph[nid] = {**copy.deepcopy(entry), "inputs": dict(inputs)}

    for nid, entry in graph.items():
        spec, inputs = specs[nid], entry["inputs"]
        for name in inputs:
            if spec.input(name) is None:
                raise _err(f"{spec.id} has no such input (known: {', '.join(i.name for i in spec.inputs)})",
                           source, nid, entry, name)
        for inp in spec.inputs:
            if inp.name not in inputs:
                if inp.is_widget and inp.default is not None:
                    inputs[inp.name] = inp.default
                elif not inp.optional:
                    raise _err("required input is missing", source, nid, entry, inp.name)
                continue
            value = inputs[inp.name]
            if is_link(value):
                src_id, slot = value
                if src_id not in graph:
                    raise _err(f"linked to node {src_id}, which does not exist", source, nid, entry, inp.name)
                src_spec = specs[src_id]
                if not 0 <= slot < len(src_spec.outputs):
                    raise _err(f"linked to output {slot} of node {src_id}, which has "
                               f"{len(src_spec.outputs)} output(s)", source, nid, entry, inp.name)
                produced = src_spec.outputs[slot].type
                if not types_compatible(produced, inp.type):
                    raise _err(f"type mismatch: node {src_id} output {slot} gives {produced}, "
                               f"this input takes {inp.type}", source, nid, entry, inp.name)
            elif isinstance(value, list) and len(value) == 2 and not inp.is_widget:
                raise _err(f"malformed link {value!r}: expected [node_id (string), output index]",
                           source, nid, entry, inp.name)
            elif inp.is_widget:
                try:
                    inputs[inp.name] = inp.check(value)
                except InputError as e:
                    raise _err(str(e), source, nid, entry, e.input_name) from None
            elif value is not None and inp.type != ANY:
                raise _err(f"expects a link from a {inp.type} output, got the literal {value!r}",
                           source, nid, entry, inp.name)

    _check_acyclic(graph, source)
    if not any(spec.output_node for spec in specs.values()):
        raise WorkflowError("the workflow has no output node (e.g. Log Metric, Save LoRA, NFT Update): "
                            "nothing would run", source=source)

    for nid, entry in graph.items():
        spec = specs[nid]
        if spec.validate is not None or spec.settings is not None:
            if spec.id in skip_checks:  # keep the settings' checks, leave out the hook's
                spec = replace(spec, validate=None)
            literals = {k: v for k, v in entry["inputs"].items() if not is_link(v)}
            linked = {k: {"class_type": graph[v[0]]["class_type"],
                          **{n: x for n, x in graph[v[0]]["inputs"].items() if not is_link(x)}}
                      for k, v in entry["inputs"].items() if is_link(v)}
            try:
                spec.check(literals, linked)
            except InputError as e:
                raise _err(str(e), source, nid, entry, e.input_name) from None
            except (FileNotFoundError, ValueError) as e:
                raise _err(str(e), source, nid, entry) from None
    return graph


def _check_acyclic(graph: ApiGraph, source: str) -> None:
    """Loops are graph expansions, never static cycles: any cycle is an error."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for start in graph:
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, _sources(graph, start))]
        state[start] = 1
        while stack:
            nid, todo = stack[-1]
            if not todo:
                state[nid] = 2
                stack.pop()
                continue
            src = todo.pop()
            if state.get(src) == 1:
                cycle = [n for n, _ in stack][[n for n, _ in stack].index(src):]
                entry = graph[src]
                raise _err(f"the graph has a cycle ({' -> '.join(cycle + [src])}); use Loop Start / "
                           "Loop End to repeat work", source, src, entry)
            if not state.get(src):
                state[src] = 1
                stack.append((src, _sources(graph, src)))


def _sources(graph: ApiGraph, nid: str) -> list[str]:
    return sorted({v[0] for v in graph[nid]["inputs"].values() if is_link(v)}, key=_sort_key)
