"""Errors a user can act on: each renders as one line naming the file, node and input."""
from __future__ import annotations


class WorkflowError(ValueError):
    """A workflow that cannot run. `str(err)` is the one-line message shown to the user."""

    def __init__(self, message: str, *, source: str | None = None, node_id: str | None = None,
                 title: str | None = None, class_type: str | None = None, input_name: str | None = None):
        self.source, self.node_id, self.title = source, node_id, title
        self.class_type, self.input_name, self.detail = class_type, input_name, message
        where = []
        if source:
            where.append(source)
        if node_id is not None:
            node = f"node {node_id}"
            if title:
                node += f" {title!r}"
            if class_type:
                node += f" ({class_type})"
            where.append(node)
        if input_name:
            where.append(f"input {input_name!r}")
        super().__init__(": ".join([*where, " ".join(message.split())]))
