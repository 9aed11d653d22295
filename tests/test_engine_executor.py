"""Executor: loops by expansion, outputs freed early, flat memory, interruption, node errors."""
import gc
import threading
import tracemalloc

import pytest
from engine_helpers import sum_loop

from solrl_core.graph.executor import NodeError, execute
from solrl_core.graph.validate import validate
from solrl_core.runtime.context import Interrupted, RunContext


class Recorder(RunContext):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.nodes = []

    def on_node_start(self, node_id, title):
        self.nodes.append((node_id, title))


class MemoryProbe(RunContext):
    """The Python memory allocated (all of it is traced) at the given loop iterations; keeps nothing else."""

    def __init__(self, sample_at):
        super().__init__()
        self.sample_at, self.allocated = set(sample_at), {}

    def on_loop_iteration(self, loop_id, index, total):
        if index in self.sample_at:
            gc.collect()
            self.allocated[index] = tracemalloc.get_traced_memory()[0]


def test_loop_result_and_node_order():
    ctx = Recorder()
    res = execute(validate(sum_loop(4)), ctx)
    assert res.outputs["6"] == (6.0,)
    assert [t for _, t in ctx.nodes] == ["Number", "Loop Start", "Adder", "Log Metric", "Loop End"] * 1 + \
        ["Loop Start", "Adder", "Log Metric", "Loop End"] * 3 + ["Final"]
    # Clones report the workflow's node ids, so progress and errors name nodes the user knows.
    assert {n for n, _ in ctx.nodes} == {"1", "2", "3", "4", "5", "6"}


def test_thousand_iterations_flat_memory_and_linear_ids():
    ctx = MemoryProbe(sample_at=(100, 999))
    graph = validate(sum_loop(1000, step=1.0))
    tracemalloc.start()
    try:
        res = execute(graph, ctx)
    finally:
        tracemalloc.stop()
    assert res.outputs["6"] == (1000.0,)
    assert res.nodes_run == 2 + 4 * 1000
    # Outputs are freed as soon as the last consumer ran: a handful live at any time.
    assert res.max_live_outputs <= 8
    # Ids are "<loop end id>.<iteration>.<node id>": their length grows like log10(iteration).
    assert res.max_id_length <= len("5.999.5")
    # Everything the engine allocates (graph, outputs, counters, waiting loop ends, ui results) is
    # traced: over 899 iterations it may grow by 8 bytes an iteration (longer ids, dict slack), where
    # keeping one 4-entry clone, one output tuple or one counter per iteration would add 100 to 1500.
    growth = ctx.allocated[999] - ctx.allocated[100]
    assert growth < 8 * 899, f"{growth / 899:.0f} bytes per iteration"


def test_interrupt_stops_at_node_boundary(tmp_path):
    ctx = Recorder(run_dir=tmp_path)
    stop_after = 7

    class Stopper(Recorder):
        def on_node_start(self, node_id, title):
            super().on_node_start(node_id, title)
            if len(self.nodes) == stop_after:
                self.interrupt_event.set()

    ctx = Stopper(run_dir=tmp_path)
    with pytest.raises(Interrupted):
        execute(validate(sum_loop(50)), ctx)
    # The node that saw the request still ran; nothing after it did.
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and len(ctx.nodes) == stop_after


def test_node_failure_names_the_node():
    g = validate(sum_loop(3))
    g["3"]["inputs"]["operation"] = "power"
    g["3"]["inputs"]["b"] = 1e6  # overflow -> OverflowError inside the op
    with pytest.raises(NodeError, match=r"node 3 'Adder' \(SolRLMath\): OverflowError") as e:
        g["1"]["inputs"]["value"] = 10.0
        execute(g)
    assert isinstance(e.value.__cause__, OverflowError)


def test_stop_input_ends_loop_early():
    g = validate(sum_loop(100))
    g["5"]["inputs"]["stop"] = True
    assert execute(g).outputs["6"] == (1.5,)


def test_context_is_thread_local_default():
    seen = []
    threading.Thread(target=lambda: seen.append(execute(validate(sum_loop(2))).outputs["6"])).start()
    assert execute(validate(sum_loop(2))).outputs["6"] == (3.0,)
