"""Build API-format graphs in code (the bundled workflows are generated this way)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..ops.registry import get_op
from .workflow import ApiGraph


@dataclass(frozen=True)
class NodeRef:
    id: str
    class_type: str

    def out(self, name_or_index: str | int) -> list:
        if isinstance(name_or_index, int):
            return [self.id, name_or_index]
        names = [o.name for o in get_op(self.class_type).outputs]
        return [self.id, names.index(name_or_index)]


class GraphBuilder:
    def __init__(self) -> None:
        self.graph: ApiGraph = {}

    def add(self, class_type: str, title: str | None = None, **inputs: Any) -> NodeRef:
        if get_op(class_type) is None:
            raise KeyError(f"unknown op {class_type!r}")
        nid = str(len(self.graph) + 1)
        entry: dict[str, Any] = {"class_type": class_type, "inputs": inputs}
        if title:
            entry["_meta"] = {"title": title}
        self.graph[nid] = entry
        return NodeRef(nid, class_type)
