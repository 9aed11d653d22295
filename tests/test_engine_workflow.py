"""Workflow formats: UI <-> API conversion and execution equivalence."""
import json

from engine_helpers import sum_loop

from solrl_core.graph.executor import execute
from solrl_core.graph.validate import validate
from solrl_core.graph.workflow import api_to_ui, load_workflow, ui_to_api


def _strip(api):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"], **({"_meta": v["_meta"]} if "_meta" in v else {})}
            for k, v in api.items()}


def test_ui_api_ui_round_trip_preserves_graph():
    api = validate(sum_loop(5))
    ui = api_to_ui(api)
    back = validate(ui_to_api(ui))
    assert _strip(back) == _strip(api)
    ui2 = api_to_ui(back)
    assert ui2["nodes"] == ui["nodes"] and ui2["links"] == ui["links"]
    # Layout reads left to right: every link goes from a column to a later one.
    pos = {n["id"]: n["pos"][0] for n in ui["nodes"]}
    assert all(pos[src] < pos[dst] for _, src, _, dst, _, _ in ui["links"])


def test_same_workflow_in_both_formats_executes_identically(tmp_path):
    api = validate(sum_loop(7, step=2.25))
    (tmp_path / "a.json").write_text(json.dumps(api))
    (tmp_path / "u.json").write_text(json.dumps(api_to_ui(api)))
    results = []
    for name in ("a.json", "u.json"):
        graph, fmt = load_workflow(tmp_path / name)
        res = execute(validate(graph))
        results.append((fmt, res.outputs["6"], res.nodes_run))
    assert results[0][0] == "api" and results[1][0] == "ui"
    assert results[0][1:] == results[1][1:]
    assert results[0][1] == (7 * 2.25,)


def _ui_node(nid, kind, widgets, inputs=(), mode=0, title=None):
    node = {"id": nid, "type": kind, "mode": mode, "inputs": list(inputs), "outputs": [], "widgets_values": widgets}
    if title:
        node["title"] = title
    return node


def test_ui_conversion_handles_bypass_mute_reroute_primitive_notes():
    ui = {"nodes": [
        _ui_node(1, "SolRLNumber", [4.0]),
        _ui_node(2, "SolRLMath", [0.0, 10.0, "add"],  # bypassed: passes its FLOAT input through
                 [{"name": "a", "type": "FLOAT", "link": 1, "widget": {"name": "a"}}], mode=4),
        _ui_node(3, "Reroute", [], [{"name": "", "type": "*", "link": 2}]),
        _ui_node(4, "PrimitiveNode", [3.0]),
        _ui_node(5, "SolRLMath", [0.0, 0.0, "multiply"],
                 [{"name": "a", "type": "FLOAT", "link": 3, "widget": {"name": "a"}},
                  {"name": "b", "type": "FLOAT", "link": 4, "widget": {"name": "b"}}], title="Times"),
        _ui_node(6, "SolRLLogMetric", ["out", 0.0, -1], [{"name": "value", "type": "FLOAT", "link": 5,
                                                         "widget": {"name": "value"}}]),
        _ui_node(7, "SolRLLogMetric", ["muted", 1.0, -1], mode=2),
        _ui_node(8, "Note", ["just a note"]),
    ], "links": [[1, 1, 0, 2, 0, "FLOAT"], [2, 2, 0, 3, 0, "FLOAT"], [3, 3, 0, 5, 0, "FLOAT"],
                 [4, 4, 0, 5, 1, "FLOAT"], [5, 5, 0, 6, 1, "FLOAT"]]}
    api = ui_to_api(ui)
    assert set(api) == {"1", "5", "6"}
    assert api["5"]["inputs"] == {"a": ["1", 0], "b": 3.0, "operation": "multiply"}
    assert api["5"]["_meta"]["title"] == "Times"
    assert execute(validate(api)).outputs["6"] == (12.0,)


def test_seed_widget_control_value_is_skipped():
    from solrl_core.graph.workflow import _widget_values_by_name
    from solrl_core.ops.spec import Input, OpSpec, Output

    spec = OpSpec("SolRLTestSeed", "t", "Sol-RL/test", "", (Input("seed", "INT", 0, seed=True), Input("steps", "INT", 1)),
                  (Output("x", "INT"),), lambda **k: (0,))
    assert _widget_values_by_name({"widgets_values": [42, "randomize", 6]}, spec, "f") == {"seed": 42, "steps": 6}
    assert _widget_values_by_name({"widgets_values": [42, 6]}, spec, "f") == {"seed": 42, "steps": 6}
