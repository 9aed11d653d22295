"""Run logs the ecosystem reads: TensorBoard event files with every metrics row and the previews."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from model_factories import build_sana, save_pipeline
from test_train_loop import SMALL

from solrl_core.bundled import training_graph
from solrl_core.run import main

pytest.importorskip("tensorboard")


def test_tensorboard_event_files_hold_every_row_and_the_previews(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = save_pipeline(build_sana(seed=0, with_vae=False, sample_size=8), tmp_path / "pix")
    graph = training_graph(replace(SMALL, model=str(model), iterations=2))
    next(e for e in graph.values() if e["class_type"] == "SolRLTrainingRun")["inputs"]["log_to"] = "tensorboard"
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(graph))
    run_dir = tmp_path / "run"
    assert main([str(wf), "--run-dir", str(run_dir)]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    for key in ("reward_mean", "draft_reward_mean", "loss", "grad_norm"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == \
            [(r["iteration"], pytest.approx(r[key], rel=1e-6)) for r in rows if "iteration" in r], key
    assert [e.step for e in events.Images("previews")] == [0, 1]


def test_tensorboard_is_off_by_default(tmp_path):
    model = save_pipeline(build_sana(seed=0, with_vae=False, sample_size=8), tmp_path / "pix")
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(training_graph(replace(SMALL, model=str(model), iterations=1))))
    assert main([str(wf), "--run-dir", str(tmp_path / "run")]) == 0
    assert not (tmp_path / "run" / "tensorboard").exists()
