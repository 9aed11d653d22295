"""Held out means held out: the Held-out Reward scores prompts the run never trains on, the split is
seeded and fixed (any prompt order, every resume), and a run cannot resume with another split."""
from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from model_factories import build_sana, save_pipeline

from solrl_core.bundled import QUICKSTART, Recipe, training_graph
from solrl_core.models import load_policy
from solrl_core.rewards import REWARDS
from solrl_core.rewards.shapes import ShapesReward
from solrl_core.run import main
from solrl_core.train.prompts import load_prompts, split_prompts
from solrl_core.train.session import SessionConfig, TrainingSession

COUNTS = load_prompts("shapes_count")  # 45 distinct prompts


def test_split_is_disjoint_complete_and_sized():
    train, held = split_prompts(COUNTS, 15, seed=0)
    assert len(held) == len(set(held)) == 15 and len(train) == 30
    assert not set(train) & set(held) and set(train) | set(held) == set(COUNTS)
    assert held == [p for p in COUNTS if p in held]  # in the set's order
    assert split_prompts(COUNTS, 0, seed=0) == (COUNTS, [])


def test_split_is_seeded_and_independent_of_prompt_order():
    held = split_prompts(COUNTS, 15, seed=0)[1]
    assert split_prompts(COUNTS, 15, seed=0)[1] == held
    shuffled = COUNTS[:]
    random.Random(1).shuffle(shuffled)
    assert set(split_prompts(shuffled, 15, seed=0)[1]) == set(held)
    others = [set(split_prompts(COUNTS, 15, seed=s)[1]) for s in (1, 2, 3)]
    assert all(o != set(held) for o in others)  # another run seed holds out other prompts
    # Growing the set keeps most of the earlier choice (each prompt's rank is its own hash).
    assert len(set(split_prompts(COUNTS + ["one more"], 15, seed=0)[1]) & set(held)) >= 14


def test_a_repeated_prompt_is_never_on_both_sides():
    prompts = ["a red circle", "a red circle", "a blue square", "a green triangle", "a red circle"]
    for seed in range(20):
        train, held = split_prompts(prompts, 2, seed)  # two distinct prompts, however often each is listed
        assert len(set(held)) == 2 and not set(held) & set(train)
        assert len(train) == len(prompts) - sum(prompts.count(p) for p in held)


@pytest.mark.parametrize("held_out", [-1, 45, 46])
def test_split_must_leave_training_prompts(held_out):
    with pytest.raises(ValueError, match=f"held_out={held_out} .* 45 distinct prompts"):
        split_prompts(COUNTS, held_out, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_pipeline(build_sana(seed=0, with_vae=False, sample_size=8), tmp_path_factory.mktemp("m") / "pix"))


def test_training_never_draws_a_held_out_prompt_and_resume_keeps_the_split(tmp_path, model_dir):
    policy = load_policy(model_dir)
    config = SessionConfig(seed=3, total_iterations=20, lora_rank=2, lora_alpha=2.0, held_out=15)
    s = TrainingSession(tmp_path / "run", policy, COUNTS, config)
    held = s.held_out_prompts
    assert held == split_prompts(COUNTS, 15, seed=3)[1]
    assert json.loads((tmp_path / "run" / "session.json").read_text())["held_out_prompts"] == held
    seen = []
    for _ in range(7):  # 7 x 8 prompts: the 30 training prompts once, and most a second time
        seen += s.next_prompts(8)
        s.commit({})
    assert not set(seen) & set(held) and set(seen) == set(COUNTS) - set(held)
    # A resumed run has the same split and goes on with the same training order.
    expected = s.next_prompts(8)
    resumed = TrainingSession(tmp_path / "run", policy, COUNTS, config)
    assert resumed.iteration == 7 and resumed.held_out_prompts == held
    assert resumed.next_prompts(8) == expected
    with pytest.raises(ValueError, match="held_out"):
        TrainingSession(tmp_path / "run", policy, COUNTS, replace(config, held_out=10))
    # An edited prompt set that moves prompts across the split cannot resume the run either.
    edited = [p for p in COUNTS if p != held[0]]
    with pytest.raises(ValueError, match="prompts held out"):
        TrainingSession(tmp_path / "run", policy, edited, config)


class RecordingShapes(ShapesReward):
    """The shapes reward, recording the prompts of every call."""

    name = "recording_shapes"
    calls: list[list[str]] = []

    def __call__(self, images, prompts):
        RecordingShapes.calls.append(list(prompts))
        return super().__call__(images, prompts)


def test_the_held_out_reward_node_scores_only_held_out_prompts(tmp_path, model_dir, monkeypatch):
    monkeypatch.setitem(REWARDS, "recording_shapes", RecordingShapes)
    RecordingShapes.calls = []
    recipe = Recipe(model=model_dir, reward="recording_shapes", prompts="shapes_count", run_name="t", iterations=3,
                    prompts_per_iteration=4, candidates=4, keep=2, draft_steps=2, full_steps=2, min_dim=0,
                    lora_rank=2, lora_alpha=2.0, micro_batch=8, batch_size=64, eval_every=1, held_out=5)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(training_graph(recipe)))
    assert main([str(wf), "--run-dir", str(tmp_path / "run")]) == 0
    held = json.loads((tmp_path / "run" / "session.json").read_text())["held_out_prompts"]
    assert held == split_prompts(COUNTS, 5, seed=0)[1]
    evals = [c for c in RecordingShapes.calls if set(c) <= set(held)]
    trained = [c for c in RecordingShapes.calls if not set(c) & set(held)]
    assert len(evals) + len(trained) == len(RecordingShapes.calls)  # no call mixes the two
    assert evals == [[p for p in held for _ in range(4)]] * 3  # every held-out prompt x 4 fixed seeds, each time
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("eval_reward_mean" in r for r in rows)


def test_held_out_larger_than_the_set_fails_before_compute(tmp_path, capsys):
    recipe = replace(QUICKSTART, prompts="shapes_single", held_out=15)  # 15 prompts: none left to train on
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(training_graph(recipe)))
    assert main([str(wf), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "SolRLTrainingRun" in err and "'held_out'" in err and "15 distinct prompts" in err, err
    assert not (tmp_path / "run").exists()


def test_quickstart_holds_out_what_it_evaluates():
    assert QUICKSTART.eval_every > 0 and QUICKSTART.held_out > 0
    train, held = split_prompts(load_prompts(QUICKSTART.prompts), QUICKSTART.held_out, QUICKSTART.seed)
    assert held and train and 0 <= QUICKSTART.eval_prompts <= len(held)


def test_held_out_reward_without_held_out_prompts_is_an_error_naming_the_setting(tmp_path, model_dir, capsys):
    recipe = Recipe(model=model_dir, prompts="shapes_count", run_name="t", iterations=2, prompts_per_iteration=2,
                    candidates=2, keep=2, full_steps=2, stage1="full", regenerate=False, lora_rank=2,
                    lora_alpha=2.0, eval_every=1, held_out=0)
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(training_graph(recipe)))
    assert main([str(wf), "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "no held-out prompts" in err and "held_out" in err, err
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # the iteration was not committed
