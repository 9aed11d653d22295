"""Loops by graph expansion, in ComfyUI's protocol.

The loop-close op, when another iteration is due, clones every node between the loop-open and
itself and returns ``{"result": (link to the cloned close,), "expand": clones}``; the host runs
the clones and takes the clone's output as its own. Works on any host graph that offers
``get_node(id)`` and ``get_display_node_id(id)`` (ComfyUI's DynamicPrompt and our own).

Clone ids are ``<display id of the close>.<iteration>.<display id of the original>``: they stay
short (ids grow linearly with the iteration count, not quadratically as nested prefixes would).
"""
from __future__ import annotations

from typing import Any, Protocol

from .workflow import is_link


class GraphView(Protocol):
    def get_node(self, node_id: str) -> dict[str, Any]: ...

    def get_display_node_id(self, node_id: str) -> str: ...


def _links(node: dict[str, Any]) -> list[str]:
    return [v[0] for v in node.get("inputs", {}).values() if is_link(v)]


def loop_body(graph: GraphView, open_id: str, close_id: str) -> list[str]:
    """Nodes that depend on the open node and feed the close node (both ends included)."""
    children: dict[str, set[str]] = {}
    seen = {close_id}
    stack = [close_id]
    while stack:
        nid = stack.pop()
        for src in _links(graph.get_node(nid)):
            children.setdefault(src, set()).add(nid)
            if src not in seen:
                seen.add(src)
                stack.append(src)
    if open_id not in seen:
        raise ValueError(f"loop end {close_id} is not downstream of its loop start {open_id}")
    body = {open_id}
    stack = [open_id]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in body:
                body.add(child)
                stack.append(child)
    body.add(close_id)
    return sorted(body)


def expand_iteration(graph: GraphView, open_id: str, close_id: str, iteration: int,
                     open_inputs: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], str]:
    """Clone the loop body for `iteration`; returns (new nodes, id of the cloned close node).

    `open_inputs` overrides inputs of the cloned open node (the loop-carried values).
    """
    body = loop_body(graph, open_id, close_id)
    display = {nid: graph.get_display_node_id(nid) for nid in body}
    if len(set(display.values())) != len(body):
        raise ValueError("nested loops inside one loop body are not supported")
    prefix = f"{display[close_id]}.{iteration}."
    new_id = {nid: prefix + display[nid] for nid in body}
    clones: dict[str, dict[str, Any]] = {}
    for nid in body:
        node = graph.get_node(nid)
        inputs = {}
        for name, value in node.get("inputs", {}).items():
            inputs[name] = [new_id[value[0]], value[1]] if is_link(value) and value[0] in new_id else value
        if nid == open_id:
            inputs.update(open_inputs)
        clones[new_id[nid]] = {"class_type": node["class_type"], "inputs": inputs,
                               "override_display_id": display[nid]}
    return clones, new_id[close_id]
