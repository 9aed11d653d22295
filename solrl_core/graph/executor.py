"""Run a validated API graph: dependency order, graph expansion for loops, outputs freed early.

Unlike ComfyUI (which caches every node output of a prompt, so long loops grow in memory), each
output here is dropped as soon as nothing can consume it any more. A node that may expand
(Loop End) holds a reference on all its ancestors until it has run, because the clone it
returns will consume them again. An expanded node whose result is only the output of a clone
that expands in turn (each Loop End waiting on the next iteration's) waits directly on the newer
clone's result, so a loop of any length keeps one waiting node, not one per iteration.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..ops.registry import get_op
from ..ops.spec import OpSpec
from ..runtime.context import Interrupted, RunContext, current_context, use_context
from .errors import WorkflowError
from .workflow import ApiGraph, _sort_key, is_link

log = logging.getLogger("solrl")


class NodeError(RuntimeError):
    """An op failed while running; the message names the node. `__cause__` is the original."""


class DynamicGraph:
    """The live graph: the workflow plus nodes added by expansion (ComfyUI's DynamicPrompt API)."""

    def __init__(self, api: ApiGraph):
        self._nodes: dict[str, dict[str, Any]] = dict(api)
        self._display: dict[str, str] = {}
        self._original = frozenset(api)

    def get_node(self, node_id: str) -> dict[str, Any]:
        return self._nodes[node_id]

    def has_node(self, node_id: str) -> bool:
        return node_id in self._nodes

    def add_ephemeral_node(self, node_id: str, info: dict[str, Any], parent_id: str, display_id: str) -> None:
        if node_id in self._nodes:
            raise RuntimeError(f"expansion of node {parent_id} adds node {node_id}, which already exists")
        self._nodes[node_id] = info
        self._display[node_id] = display_id

    def get_display_node_id(self, node_id: str) -> str:
        return self._display.get(node_id, node_id)

    def is_expansion(self, node_id: str) -> bool:
        return node_id not in self._original

    def forget(self, node_id: str) -> bool:
        """Drop a finished expansion node's definition (keeps memory flat over long loops)."""
        if node_id in self._original:
            return False
        self._nodes.pop(node_id, None)
        self._display.pop(node_id, None)
        return True

    def __len__(self) -> int:
        return len(self._nodes)

    def ids(self) -> list[str]:
        return list(self._nodes)


@dataclass
class ExecutionResult:
    # Per display id (the workflow's node id), the "ui" dict of its last run that returned one.
    ui: dict[str, dict] = field(default_factory=dict)
    # Per display id of an output node, the outputs of its last run.
    outputs: dict[str, tuple] = field(default_factory=dict)
    nodes_run: int = 0
    max_live_outputs: int = 0
    max_id_length: int = 0


class Executor:
    def __init__(self, api: ApiGraph, ctx: RunContext | None = None):
        self.graph = DynamicGraph(api)
        self.ctx = ctx or current_context()
        self.outputs: dict[str, tuple] = {}
        self.remaining: dict[str, int] = defaultdict(int)
        self.waiting: dict[str, list] = {}  # expanded node -> its result (links into the expansion)
        self.tail_of: dict[str, str] = {}  # node -> the expanded node whose result is only its outputs
        self.pins: dict[str, list[str]] = {}  # expanding node -> ancestors it holds
        self.done: set[str] = set()
        self.result = ExecutionResult()
        self.titles = {nid: (e.get("_meta") or {}).get("title") for nid, e in api.items()}

    # --- bookkeeping ------------------------------------------------------------------
    def _spec(self, nid: str) -> OpSpec:
        return get_op(self.graph.get_node(nid)["class_type"])

    def _sources(self, nid: str) -> list[str]:
        return [v[0] for v in self.graph.get_node(nid).get("inputs", {}).values() if is_link(v)]

    def _ancestors(self, nid: str) -> list[str]:
        seen: set[str] = set()
        stack = self._sources(nid)
        while stack:
            src = stack.pop()
            if src not in seen:
                seen.add(src)
                stack.extend(self._sources(src))
        return sorted(seen)

    def _plan(self, nids: list[str]) -> None:
        """Count the references the given (new) nodes will make to their sources."""
        for nid in nids:
            for src in self._sources(nid):
                self.remaining[src] += 1
            if self._spec(nid).expands:
                self.pins[nid] = self._ancestors(nid)
                for src in self.pins[nid]:
                    self.remaining[src] += 1

    def _free(self, nid: str) -> None:
        self.outputs.pop(nid, None)
        self.remaining.pop(nid, None)
        if self.graph.forget(nid):
            self.done.discard(nid)

    def _release(self, src: str) -> None:
        self.remaining[src] -= 1
        if self.remaining[src] <= 0 and src in self.done:
            self._free(src)

    def _finish(self, nid: str, values: tuple) -> None:
        self.outputs[nid] = values
        self.done.add(nid)
        self.result.max_live_outputs = max(self.result.max_live_outputs, len(self.outputs))
        if self._spec(nid).output_node:
            self.result.outputs[self.graph.get_display_node_id(nid)] = values
        if self.remaining.get(nid, 0) <= 0:  # nobody consumes it
            self._free(nid)

    def _wait(self, nid: str, result: list) -> None:
        """`nid` finishes when the nodes its result links to have run."""
        targets = {v[0] for v in result if is_link(v)}
        for v in result:
            if is_link(v):
                self.remaining[v[0]] += 1
        self.waiting[nid] = result
        if len(targets) == 1:
            self.tail_of[targets.pop()] = nid

    def _wait_for_expansion(self, nid: str, result: list) -> None:
        """`nid` expanded and returned `result` (links into its expansion). When the only consumer of
        `nid` is an expanded node waiting on it (the previous iteration's Loop End), that node waits
        on `result` itself and `nid` is dropped: a chain of expansions keeps one waiting node."""
        waiter = self.tail_of.pop(nid, None)
        if (waiter is not None and self.graph.is_expansion(nid)
                and self.remaining[nid] == sum(is_link(v) for v in self.waiting[waiter])):
            forwarded = [result[v[1]] if is_link(v) else v for v in self.waiting.pop(waiter)]
            self.remaining.pop(nid, None)
            self.graph.forget(nid)
            self._wait(waiter, forwarded)
        else:
            self._wait(nid, result)

    # --- running ------------------------------------------------------------------------
    def run(self) -> ExecutionResult:
        with use_context(self.ctx):
            return self._run()

    def _run(self) -> ExecutionResult:
        nodes = sorted(self.graph.ids(), key=_sort_key)
        targets = [nid for nid in nodes if self._spec(nid).output_node]
        needed: set[str] = set(targets)
        for t in targets:
            needed.update(self._ancestors(t))
        self._plan(sorted(needed, key=_sort_key))
        stack = list(reversed(targets))
        while stack:
            nid = stack[-1]
            if nid in self.done or not self.graph.has_node(nid):
                stack.pop()
                continue
            if nid in self.waiting:
                deps = [v[0] for v in self.waiting[nid] if is_link(v) and v[0] not in self.done]
                if deps:
                    stack.extend(deps)
                    continue
                result = self.waiting.pop(nid)
                values = tuple(self.outputs[v[0]][v[1]] if is_link(v) else v for v in result)
                for v in result:
                    if is_link(v):
                        self._release(v[0])
                stack.pop()
                self._finish(nid, values)
                continue
            deps = [s for s in self._sources(nid) if s not in self.done]
            if deps:
                stack.extend(reversed(deps))
                continue
            new_targets = self._run_node(nid)
            if nid in self.done:
                stack.pop()
            stack.extend(reversed(new_targets))
        return self.result

    def _run_node(self, nid: str) -> list[str]:
        """Run one node; returns output nodes added by its expansion (to be run too)."""
        self.ctx.check_interrupt()
        node = self.graph.get_node(nid)
        spec = self._spec(nid)
        display = self.graph.get_display_node_id(nid)
        title = self.titles.get(display) or spec.display_name
        self.ctx.on_node_start(display, title)
        kwargs: dict[str, Any] = {}
        for name, value in node.get("inputs", {}).items():
            kwargs[name] = self.outputs[value[0]][value[1]] if is_link(value) else value
        if spec.expands:
            kwargs.update(graph=self.graph, node_id=nid)
        try:
            ret = spec.function(**kwargs)
        except (WorkflowError, Interrupted):
            raise
        except Exception as e:
            raise NodeError(f"node {display} {title!r} ({spec.id}): {type(e).__name__}: "
                            f"{' '.join(str(e).split())}") from e
        finally:
            kwargs.clear()
        self.result.nodes_run += 1
        self.result.max_id_length = max(self.result.max_id_length, len(nid))
        for src in self._sources(nid):
            self._release(src)

        new_targets: list[str] = []
        if isinstance(ret, dict):
            if ret.get("ui"):
                self.result.ui[display] = ret["ui"]
            expansion = ret.get("expand")
            values = tuple(ret.get("result") or ())
        else:
            expansion, values = None, tuple(ret)
        if expansion:
            for new_id, info in expansion.items():
                self.graph.add_ephemeral_node(new_id, info, nid, info.get("override_display_id", display))
            self._plan(list(expansion))
            self._wait_for_expansion(nid, list(values))
            new_targets = [n for n in expansion if self._spec(n).output_node]
        elif len(values) != len(spec.outputs):
            raise NodeError(f"node {display} {title!r} ({spec.id}): returned {len(values)} values, "
                            f"declares {len(spec.outputs)} outputs")
        else:
            self._finish(nid, values)
        for src in self.pins.pop(nid, ()):
            self._release(src)
        return new_targets


def execute(api: ApiGraph, ctx: RunContext | None = None) -> ExecutionResult:
    return Executor(api, ctx).run()
