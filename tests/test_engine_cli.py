"""CLI: overrides, conversion, node list, run directory contents."""
import json
from pathlib import Path

from engine_helpers import sum_loop

from solrl_core.graph.workflow import detect_format
from solrl_core.run import main

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path, graph, name="wf.json"):
    path = tmp_path / name
    path.write_text(json.dumps(graph))
    return path


def test_run_writes_run_directory(tmp_path, capsys):
    wf = _write(tmp_path, sum_loop(3))
    run_dir = tmp_path / "run"
    assert main([str(wf), "--run-dir", str(run_dir)]) == 0
    resolved = json.loads((run_dir / "workflow_api.json").read_text())
    assert resolved["3"]["inputs"]["operation"] == "add"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"packages", "device", "torch_threads", "seeds", "git_commit", "command"} <= set(manifest)
    assert manifest["packages"]["torch"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["value"] for r in rows] == [1.5, 3.0, 4.5, 4.5]
    assert (run_dir / "run.log").exists()


def test_default_run_dir_is_named_after_workflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wf = _write(tmp_path, sum_loop(1), "my_flow.json")
    assert main([str(wf)]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("my_flow-")


def test_set_overrides_by_id_and_title(tmp_path):
    wf = _write(tmp_path, sum_loop(3))
    run_dir = tmp_path / "run"
    assert main([str(wf), "--run-dir", str(run_dir), "--set", "2.iterations=5", "--set", "Adder.b=2"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["value"] == 10.0


def test_set_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default run directory (runs/<name>-<time>) would go
    wf = _write(tmp_path, sum_loop(3))
    assert main([str(wf), "--set", "Nobody.b=2"]) == 2
    assert "no node has id or title 'Nobody'" in capsys.readouterr().err
    assert main([str(wf), "--set", "Adder.b=lots"]) == 2
    assert "node 3 'Adder' (SolRLMath): input 'b': expected a number" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["wf.json"]  # nothing written


def test_conversion_and_validate_only(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wf = _write(tmp_path, sum_loop(3))
    assert main([str(wf), "--to-ui", str(tmp_path / "ui.json")]) == 0
    ui = json.loads((tmp_path / "ui.json").read_text())
    assert detect_format(ui) == "ui"
    assert main([str(tmp_path / "ui.json"), "--to-api", str(tmp_path / "api.json")]) == 0
    assert detect_format(json.loads((tmp_path / "api.json").read_text())) == "api"
    assert main([str(tmp_path / "ui.json"), "--validate-only"]) == 0
    assert "ok (6 nodes)" in capsys.readouterr().out
    assert main([str(wf), "--run-dir", "given", "--validate-only"]) == 0
    # Only the files asked for: no run directory, neither the default one (runs/ in the working folder)
    # nor the one given.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.json", "ui.json", "wf.json"]


def test_list_nodes(capsys):
    assert main(["--list-nodes"]) == 0
    out = capsys.readouterr().out
    assert "SolRLLoopStart" in out and "Sol-RL/flow" in out
