"""The Sol-RL loop end to end on a tiny pixel-space SANA built offline: resume after SIGKILL equals an
uninterrupted run, NaN rewards are dropped, bad settings fail before compute, baselines run."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from model_factories import build_sana, save_pipeline
from safetensors.torch import load_file

from solrl_core.bundled import RECIPES, Recipe, training_graph
from solrl_core.run import main

ROOT = Path(__file__).resolve().parent.parent
SMALL = Recipe(run_name="t", iterations=3, prompts_per_iteration=2, candidates=6, keep=2, draft_steps=2,
               full_steps=3, min_dim=0, lr=1e-2, micro_batch=4, lora_rank=4, lora_alpha=4.0, batch_size=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_pipeline(build_sana(seed=0, with_vae=False, sample_size=8), tmp_path_factory.mktemp("m") / "pix"))


def _workflow(tmp_path, recipe, name="wf.json"):
    path = tmp_path / name
    path.write_text(json.dumps(training_graph(recipe)))
    return path


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _state(run_dir):
    ckpt = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(ckpt / "weights.safetensors"), load_file(ckpt / "optimizer.safetensors")


def _no_time(row):
    return {k: v for k, v in row.items() if not k.startswith("time_")}


def _iteration_rows(run_dir):
    return [r for r in _rows(run_dir) if "iteration" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_dir):
    """A 4-iteration run without interruption; its workflow writes a Log Metric row at each press,
    before the run opens (node ids run in order; "0" first)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    graph = training_graph(replace(SMALL, model=model_dir, iterations=4))
    graph["0"] = {"class_type": "SolRLLogMetric", "inputs": {"name": "marker", "value": 7.0}}
    wf = tmp / "wf.json"
    wf.write_text(json.dumps(graph))
    assert main([str(wf), "--run-dir", str(tmp / "full")]) == 0
    return wf, tmp / "full"


def _start_and_signal(wf, run_dir, sig, after_rows):
    """Run the workflow in a subprocess, send `sig` once `after_rows` iteration rows are written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "solrl_core.run", str(wf), "--run-dir", str(run_dir),
                             "--threads", str(torch.get_num_threads())], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"iteration"') >= after_rows:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _assert_resumed_equals(run_dir, full_dir):
    full_rows, resumed_rows = _iteration_rows(full_dir), _iteration_rows(run_dir)
    assert [r["iteration"] for r in resumed_rows] == [0, 1, 2, 3]
    assert [_no_time(r) for r in resumed_rows] == [_no_time(r) for r in full_rows]
    (w_full, o_full), (w_res, o_res) = _state(full_dir), _state(run_dir)
    assert w_full.keys() == w_res.keys() and o_full.keys() == o_res.keys()
    assert all(torch.equal(w_full[k], w_res[k]) for k in w_full)
    assert all(torch.equal(o_full[k], o_res[k]) for k in o_full)
    assert any(k.startswith("ema.") for k in w_full) and any(k.startswith("old.") for k in w_full)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, uninterrupted):
    wf, full_dir = uninterrupted
    killed_dir = tmp_path / "killed"
    _start_and_signal(wf, killed_dir, signal.SIGKILL, after_rows=2)
    done_before = len(_iteration_rows(killed_dir))
    assert 2 <= done_before < 4, "the kill should land mid-run"
    assert [r["metric"] for r in _rows(killed_dir) if "metric" in r] == ["marker"]

    assert main([str(wf), "--run-dir", str(killed_dir)]) == 0
    _assert_resumed_equals(killed_dir, full_dir)
    # The Log Metric rows of both presses survive the kill and the resume (the run used to rewrite
    # metrics.jsonl from its own rows on resume, dropping them).
    assert [r for r in _rows(killed_dir) if "metric" in r] == [{"metric": "marker", "value": 7.0}] * 2
    assert [r for r in _rows(full_dir) if "metric" in r] == [{"metric": "marker", "value": 7.0}]


def test_ctrl_c_stops_at_a_safe_point_and_resumes_identically(tmp_path, uninterrupted):
    """SIGINT to a headless run: it finishes no further iteration than the one in progress allows, exits
    130 with how to resume, leaves the run directory consistent (every written row is checkpointed,
    no half-written checkpoint), and the resumed run equals the uninterrupted one."""
    wf, full_dir = uninterrupted
    run_dir = tmp_path / "stopped"
    code, err = _start_and_signal(wf, run_dir, signal.SIGINT, after_rows=1)
    assert code == 130, err
    assert f"interrupted: resume with --run-dir {run_dir}" in err and "Traceback" not in err
    rows = _iteration_rows(run_dir)
    assert 1 <= len(rows) < 4, "Ctrl-C should stop the run before its end"
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert saved == f"iter-{len(rows):06d}"  # the iteration in progress was dropped, the others saved
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert main([str(wf), "--run-dir", str(run_dir)]) == 0
    _assert_resumed_equals(run_dir, full_dir)


def test_loop_logs_metrics_previews_plot_and_lora(tmp_path, model_dir):
    run_dir = tmp_path / "run"
    wf = _workflow(tmp_path, replace(SMALL, model=model_dir, iterations=2, audit_every=1))
    assert main([str(wf), "--run-dir", str(run_dir)]) == 0
    rows = _rows(run_dir)
    assert len(rows) == 2
    for key in ("draft_reward_mean", "draft_reward_max", "draft_reward_min", "reward_mean", "reward_max",
                "reward_min", "time_explore", "time_regenerate", "time_train", "time_requantize", "loss",
                "grad_norm", "dropped", "quant_backend", "audit_spearman", "audit_kendall"):
        assert key in rows[0], key
    assert rows[0]["quant_backend"] == "emulated"
    assert all(r["stepped"] == 1 for r in rows)
    from PIL import Image
    assert Image.open(run_dir / "reward_mean.png").size[0] > 100
    assert len(list((run_dir / "previews").glob("*.png"))) == 2
    lora = load_file(run_dir / "lora" / "t_lora.safetensors")
    assert lora and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    report = json.loads((run_dir / "quant_report.json").read_text())
    assert report["quantized"] and report["backend"] == "emulated"


def test_nan_rewards_are_dropped_and_counted(tmp_path, model_dir, monkeypatch):
    from solrl_core.rewards import REWARDS
    from solrl_core.rewards.shapes import ShapesReward

    class HalfNaN(ShapesReward):
        name = "half_nan"

        def __call__(self, images, prompts):
            scores = super().__call__(images, prompts)
            scores[::2] = float("nan")
            return scores

    monkeypatch.setitem(REWARDS, "half_nan", HalfNaN)
    run_dir = tmp_path / "run"
    wf = _workflow(tmp_path, replace(SMALL, model=model_dir, iterations=2, reward="half_nan", keep=4))
    assert main([str(wf), "--run-dir", str(run_dir)]) == 0
    rows = _rows(run_dir)
    assert all(r["draft_dropped"] == 6 and r["dropped"] == 4 for r in rows)
    assert all(r["stepped"] == 1 and r["loss"] == r["loss"] for r in rows)


def test_baselines_share_the_quickstarts_task():
    """The bundled baselines are comparable with the quickstart: the same prompts, split, iterations,
    prompts per iteration, K trained per prompt, full steps and learning rate; they differ in stage 1."""
    quick, _ = RECIPES["quickstart"]
    for name, (candidates, stage1, regenerate) in {"diffusionnft": (8, "full", False),
                                                   "naive_scaling": (32, "full", False),
                                                   "naive_quant": (32, "low", False)}.items():
        r, _ = RECIPES[name]
        assert (r.prompts, r.held_out, r.iterations, r.prompts_per_iteration, r.keep, r.full_steps, r.lr) == \
            ("shapes_count", 15, 30, 8, 8, 8, 1e-3), name
        assert (r.candidates, r.stage1, r.regenerate) == (candidates, stage1, regenerate), name
    assert (quick.candidates, quick.stage1, quick.regenerate) == (32, "low", True)


@pytest.mark.parametrize("name", ["diffusionnft", "naive_scaling", "naive_quant"])
def test_baselines_run_and_log_the_same_metrics(tmp_path, model_dir, name):
    recipe, _ = RECIPES[name]
    recipe = replace(recipe, model=model_dir, iterations=1, prompts_per_iteration=2,
                     candidates=min(recipe.candidates, 6), keep=min(recipe.keep, 2), full_steps=3, draft_steps=2,
                     lora_rank=4, lora_alpha=4.0)
    run_dir = tmp_path / name
    assert main([str(_workflow(tmp_path, recipe)), "--run-dir", str(run_dir)]) == 0
    (row,) = _rows(run_dir)
    for key in ("reward_mean", "draft_reward_mean", "loss", "grad_norm", "dropped", "time_train"):
        assert key in row, key
    assert row["quant_backend"] == ("emulated" if name == "naive_quant" else "none")


@pytest.mark.parametrize("overrides, fragment", [
    ({"SolRLProxyRewardRanker.keep": 8, "SolRLFP4Sampler.candidates": 6}, "K must be <= N"),
    ({"SolRLProxyRewardRanker.keep": 3}, "K must be even"),
    ({"model": "/no/such/model"}, "does not exist"),
    ({"reward": "hpsv2"}, "hpsv2"),
    ({"reward": "nope:1"}, "unknown reward 'nope'"),
    ({"prompts": "missing_prompts.txt"}, "prompt file"),
])
def test_bad_settings_fail_before_compute(tmp_path, model_dir, capsys, overrides, fragment, monkeypatch):
    monkeypatch.setenv("SOLRL_MODELS_DIR", str(tmp_path / "no_models"))
    graph = training_graph(replace(SMALL, **{"model": model_dir, **{k: v for k, v in overrides.items() if "." not in k}}))
    for key, value in overrides.items():  # node inputs a Recipe itself refuses (edited in the file)
        if "." in key:
            class_type, name = key.split(".")
            next(e for e in graph.values() if e["class_type"] == class_type)["inputs"][name] = value
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(graph))
    run_dir = tmp_path / "run"
    assert main([str(wf), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and "node " in err, err
    assert not run_dir.exists()


def test_finished_run_queued_again_trains_nothing(tmp_path, model_dir):
    run_dir = tmp_path / "run"
    wf = _workflow(tmp_path, replace(SMALL, model=model_dir, iterations=1))
    assert main([str(wf), "--run-dir", str(run_dir)]) == 0
    before = _state(run_dir)[0]
    assert main([str(wf), "--run-dir", str(run_dir)]) == 0
    assert [r["iteration"] for r in _rows(run_dir)] == [0]
    after = _state(run_dir)[0]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_held_out_reward_uses_fixed_prompts_and_seeds(tmp_path, model_dir):
    run_dir = tmp_path / "run"
    wf = _workflow(tmp_path, replace(SMALL, model=model_dir, iterations=3, lr=0.0, kl_coef=0.0, eval_every=2,
                                     held_out=5, eval_prompts=3))
    assert main([str(wf), "--run-dir", str(run_dir)]) == 0
    rows = _rows(run_dir)
    assert [("eval_reward_mean" in r) for r in rows] == [True, False, True]
    # Nothing learned (lr 0): the same prompts and seeds give exactly the same held-out reward.
    assert rows[0]["eval_reward_mean"] == rows[2]["eval_reward_mean"]
