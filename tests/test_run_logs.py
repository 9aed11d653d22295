"""Run logs the ecosystem reads: TensorBoard event files and an offline Weights & Biases run, each with
every metrics row and the previews; off by default; a missing package is one line at validation."""
from __future__ import annotations

import importlib.util
import json
import struct
import sys
from dataclasses import replace

import numpy as np
import pytest
from model_factories import build_sana, save_pipeline
from PIL import Image
from test_train_loop import SMALL

from solrl_core.bundled import training_graph
from solrl_core.run import main

HAVE_WANDB = importlib.util.find_spec("wandb") is not None
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard is not installed")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_pipeline(build_sana(seed=0, with_vae=False, sample_size=8), tmp_path_factory.mktemp("m") / "pix"))


def _workflow(folder, model, iterations, log_to=None):
    graph = training_graph(replace(SMALL, model=model, iterations=iterations))
    if log_to:
        next(e for e in graph.values() if e["class_type"] == "SolRLTrainingRun")["inputs"]["log_to"] = log_to
    path = folder / "wf.json"
    path.write_text(json.dumps(graph))
    return path


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, model):
    """2 iterations with log_to tensorboard (+ wandb when installed)."""
    tmp = tmp_path_factory.mktemp("logs")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("WANDB_MODE", raising=False)  # the default: offline
        wf = _workflow(tmp, model, 2, "tensorboard+wandb" if HAVE_WANDB else "tensorboard")
        assert main([str(wf), "--run-dir", str(tmp / "run")]) == 0
    rows = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return tmp / "run", rows


def wandb_history(path):
    """The history rows a run's .wandb file stores, read as `wandb sync` does: a ':W&B' header (7
    bytes), then a leveldb-style log (32 KiB blocks; 7-byte chunk headers: crc, length, kind) of
    protobuf Records."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, pos, block, record, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        record = chunk if kind in (1, 2) else record + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            parsed = Record.FromString(record)
            if parsed.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in parsed.history.item})
    return rows


@needs_tensorboard
def test_tensorboard_event_files_hold_every_row_and_the_previews(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, rows = logged_run
    events = EventAccumulator(str(run_dir / "tensorboard"),
                              size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
    for key in ("reward_mean", "draft_reward_mean", "loss", "grad_norm"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == \
            [(r["iteration"], pytest.approx(r[key], rel=1e-6)) for r in rows if "iteration" in r], key
    assert [e.step for e in events.Images("previews")] == [0, 1]
    (config,) = events.Tensors("config/text_summary")
    assert json.loads(config.tensor_proto.string_val[0]) == {
        "seed": SMALL.seed, "total_iterations": 2, "lora_rank": SMALL.lora_rank, "lora_alpha": SMALL.lora_alpha,
        "full_finetune": False, "offload_frozen": False, "held_out": SMALL.held_out}


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed")
def test_wandb_offline_run_holds_every_row_and_the_previews(logged_run):
    run_dir, rows = logged_run
    (offline,) = (run_dir / "wandb").glob("offline-run-*")  # offline by default, inside the run directory
    (stored,) = offline.glob("run-*.wandb")
    history = wandb_history(stored)
    numbers = [{k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
               for r in rows if "iteration" in r]
    assert [{k: v for k, v in h.items() if not k.startswith("_")} for h in history if "reward_mean" in h] == \
        [pytest.approx(n, rel=1e-6) for n in numbers]
    previews = [h for h in history if "previews/path" in h]
    assert [h["iteration"] for h in previews] == [0, 1]
    for step, h in enumerate(previews):  # the very grids the run saved under previews/
        with Image.open(offline / "files" / h["previews/path"]) as logged, \
                Image.open(run_dir / "previews" / f"iter-{step:06d}.png") as saved:
            assert np.array_equal(np.asarray(logged.convert("RGB")), np.asarray(saved.convert("RGB")))


def test_run_logs_are_off_by_default(tmp_path, model):
    assert main([str(_workflow(tmp_path, model, 1)), "--run-dir", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "wandb").exists()


@pytest.mark.parametrize("log_to, package", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                             ("tensorboard+wandb", "wandb")])
def test_a_missing_package_is_one_line_at_validation(tmp_path, model, capsys, monkeypatch, log_to, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if it were not installed
    monkeypatch.chdir(tmp_path)
    assert main([str(_workflow(tmp_path, model, 1, log_to)), "--run-dir", "run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"(SolRLTrainingRun): input 'log_to': log_to {package} needs {package}, which is not installed: " \
           f'pip install -e ".[{package}]"' in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["wf.json"]
