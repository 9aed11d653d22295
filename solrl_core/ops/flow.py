"""Loop Start / Loop End: repeat the nodes between them (graph expansion, as ComfyUI does)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..graph.loops import expand_iteration
from ..runtime.context import current_context
from .registry import register
from .spec import ANY, Input, OpSpec, Output

LOOP = "SOLRL_LOOP"
LOOP_STATE = "SOLRL_LOOP_STATE"


@dataclass(frozen=True)
class LoopHandle:
    """What flows from Loop Start to Loop End: where the loop starts and how far it is."""

    open_id: str
    index: int
    iterations: int


def loop_start(iterations: int, value: Any = None, loop_state: dict | None = None,
               graph: Any = None, node_id: str = "") -> tuple:
    index = int(loop_state["index"]) if loop_state else 0
    display = graph.get_display_node_id(node_id) if graph is not None else node_id
    current_context().on_loop_iteration(display, index, iterations)
    return LoopHandle(node_id, index, iterations), value, index


def loop_end(flow: LoopHandle, value: Any = None, stop: bool = False,
             graph: Any = None, node_id: str = "") -> Any:
    if stop or flow.index + 1 >= flow.iterations:
        return (value,)
    clones, close_clone = expand_iteration(
        graph, flow.open_id, node_id, flow.index + 1,
        open_inputs={"value": value, "loop_state": {"index": flow.index + 1}})
    return {"result": ([close_clone, 0],), "expand": clones}


LOOP_START = register(OpSpec(
    id="SolRLLoopStart",
    display_name="Loop Start",
    category="Sol-RL/flow",
    description="Start of a loop: the nodes between Loop Start and Loop End run `iterations` times "
                "(or until Loop End's `stop` is true). `value` is carried from one iteration to the next.",
    inputs=(
        Input("iterations", "INT", 10, min=1, max=1_000_000, tooltip="How many times the body runs."),
        Input("value", ANY, optional=True, tooltip="Initial loop-carried value."),
        Input("loop_state", LOOP_STATE, optional=True,
              tooltip="Set by the loop itself on later iterations; leave unconnected."),
    ),
    outputs=(Output("flow", LOOP, "Connect to Loop End."), Output("value", ANY), Output("index", "INT")),
    function=loop_start,
    expands=True,
))

LOOP_END = register(OpSpec(
    id="SolRLLoopEnd",
    display_name="Loop End",
    category="Sol-RL/flow",
    description="End of a loop: runs the body again until the iteration count is reached or `stop` is "
                "true, then outputs the last `value`.",
    inputs=(
        Input("flow", LOOP, tooltip="From Loop Start."),
        Input("value", ANY, optional=True, tooltip="Carried to the next iteration's Loop Start."),
        Input("stop", "BOOLEAN", False, optional=True, tooltip="End the loop early when true."),
    ),
    outputs=(Output("value", ANY),),
    function=loop_end,
    expands=True,
))
