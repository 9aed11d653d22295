"""What a press of Run does with the state already in its run directory: resume only from an intact
checkpoint saved with the same run settings, refuse anything else before compute (exit 2, one line,
the directory untouched, nothing deleted), and start over on mode 'new' only."""
import json
import shutil
from dataclasses import replace

import pytest
import torch
from model_factories import build_sana, save_pipeline
from safetensors.torch import load_file
from test_train_loop import SMALL

from solrl_core.bundled import training_graph
from solrl_core.models import load_policy
from solrl_core.run import main
from solrl_core.train.checkpoint import CheckpointError
from solrl_core.train.session import TrainingSession
from solrl_core.train.settings import SessionConfig

RUN = SessionConfig(seed=SMALL.seed, total_iterations=2, lora_rank=SMALL.lora_rank, lora_alpha=SMALL.lora_alpha)


@pytest.fixture(scope="module")
def first_press(tmp_path_factory):
    """A run of 2 iterations after its first press (1 iteration), with a Log Metric row per press."""
    tmp = tmp_path_factory.mktemp("press")
    model = save_pipeline(build_sana(seed=0, with_vae=False, sample_size=8), tmp / "pix")
    graph = training_graph(replace(SMALL, model=str(model), iterations=RUN.total_iterations))
    next(e for e in graph.values() if e["class_type"] == "SolRLLoopStart")["inputs"]["iterations"] = 1
    graph["0"] = {"class_type": "SolRLLogMetric", "inputs": {"name": "marker", "value": 7.0}}
    wf = tmp / "wf.json"
    wf.write_text(json.dumps(graph))
    run_dir = tmp / "run"
    assert main([str(wf), "--run-dir", str(run_dir)]) == 0
    run_node = next(nid for nid, e in graph.items() if e["class_type"] == "SolRLTrainingRun")
    return wf, run_dir, run_node, str(model)


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _no_time(row):
    return {k: v for k, v in row.items() if not k.startswith("time_")}


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CKPT = "checkpoints/iter-000001"
BREAK = {  # how the state was damaged -> what the one line says
    "pointer to a missing folder": (lambda d: (d / "checkpoints/latest").write_text("iter-000009\n"),
                                    "names the checkpoint 'iter-000009', which does not exist"),
    "no state.json": (lambda d: (d / CKPT / "state.json").unlink(), "which has no state.json"),
    "state.json cut short": (lambda d: _truncate(d / CKPT / "state.json"), "unreadable state.json"),
    "weights cut short": (lambda d: _truncate(d / CKPT / "weights.safetensors"), "unreadable weights.safetensors"),
    "optimizer cut short": (lambda d: _truncate(d / CKPT / "optimizer.safetensors"),
                            "unreadable optimizer.safetensors"),
    "pointer lost": (lambda d: ((d / "checkpoints/latest").unlink(), (d / CKPT).rename(d / "checkpoints/iter-000002")),
                     "holds iter-000002 but no 'latest' file"),
}


@pytest.mark.parametrize("damage", sorted(BREAK))
def test_a_broken_checkpoint_is_refused_and_nothing_changes(first_press, tmp_path, capsys, damage):
    wf, run_dir, _, _ = first_press
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    breaker, fragment = BREAK[damage]
    breaker(broken)
    before = _files(broken)
    assert main([str(wf), "--run-dir", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(SolRLTrainingRun): input 'mode'" in err and fragment in err, err
    assert "mode 'new'" in err  # says how to go on
    assert _files(broken) == before  # not a byte written, nothing deleted


def test_the_session_refuses_a_broken_checkpoint_too(first_press, tmp_path):
    """The same refusal where no validation ran first (the Python API; a pointer broken after ComfyUI
    validated): the session raises before touching the folder, and keeps the checkpoints."""
    _, run_dir, _, model = first_press
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    (broken / CKPT / "state.json").unlink()
    before = _files(broken)
    with pytest.raises(CheckpointError, match="has no state.json"):
        TrainingSession(broken, load_policy(model), ["a red circle"], RUN)
    assert _files(broken) == before


def test_an_uncommitted_first_checkpoint_is_not_a_refusal(first_press, tmp_path):
    """A kill in the first save, after its folder and before its pointer: nothing was committed."""
    wf, run_dir, _, _ = first_press
    crashed = tmp_path / "run"
    shutil.copytree(run_dir, crashed)
    (crashed / "checkpoints/latest").unlink()
    assert main([str(wf), "--run-dir", str(crashed), "--validate-only"]) == 0


def test_resuming_with_other_run_settings_is_refused(first_press, tmp_path, capsys):
    wf, run_dir, run_node, _ = first_press
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = _files(copy)
    assert main([str(wf), "--run-dir", str(copy), "--set", f"{run_node}.seed=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a run with other settings {'seed': (0, 5)}" in err, err
    assert _files(copy) == before


def test_mode_new_starts_over_and_keeps_log_metric_rows(first_press, tmp_path):
    """mode 'new' in a used folder (even one whose pointer is broken, as the refusal suggests) equals
    the first press in an empty one: the same iteration 0, not iteration 1 of the old run."""
    wf, run_dir, run_node, _ = first_press
    again = tmp_path / "run"
    shutil.copytree(run_dir, again)
    for later in ("iter-000006", "iter-000007"):  # as if the old run had gone further
        shutil.copytree(again / CKPT, again / "checkpoints" / later)
    (again / "checkpoints/latest").write_text("iter-000009\n")
    assert main([str(wf), "--run-dir", str(again), "--set", f"{run_node}.mode=new"]) == 0
    first, second = _rows(run_dir), _rows(again)
    assert [_no_time(r) for r in second if "iteration" in r] == [_no_time(r) for r in first if "iteration" in r]
    assert [r["iteration"] for r in second if "iteration" in r] == [0]
    assert [r for r in second if "metric" in r] == [{"metric": "marker", "value": 7.0}] * 2  # both presses'
    assert sorted(p.name for p in (again / "checkpoints").iterdir()) == ["iter-000001", "latest"]
    for name in ("weights.safetensors", "optimizer.safetensors"):
        want, got = load_file(run_dir / CKPT / name), load_file(again / CKPT / name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
