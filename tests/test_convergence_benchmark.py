"""benchmarks/convergence.py: the time-to-target arithmetic, and arms that are deterministic for a seed
(everything but the timings) and differ only in their stages."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from convergence import ranking, speedups  # noqa: E402
from miniature import Curve, Task, paper_arms, run_arms  # noqa: E402


def _curve(label, seconds, reward, step=4):
    n = len(reward)
    return Curve(label, iteration=[i * step for i in range(n)], seconds=seconds, cpu_seconds=seconds,
                 reward=reward)


def test_smoothing_and_time_to_target_by_hand():
    c = _curve("a", [0, 10, 20, 30], [0.5, 0.6, 0.7, 0.8])
    assert c.smoothed() == pytest.approx([0.5, 0.6, 0.7, 0.75])  # the base model's point as measured
    # 0.65 lies halfway between the smoothed 0.6 (10 s) and 0.7 (20 s).
    assert c.time_to(0.65) == pytest.approx(15.0) and c.iterations_to(0.65) == 8
    assert c.time_to(0.5) == 0.0 and c.time_to(0.9) == math.inf and c.iterations_to(0.9) == math.inf


def test_speedup_is_the_baselines_time_over_the_arms():
    curves = {
        # smoothed 0.5, 0.6, 0.667, 0.7: its final 0.7 is first reached at the end, 150 s
        "diffusionnft": _curve("d", [0, 50, 100, 150], [0.5, 0.6, 0.7, 0.7]),
        # smoothed 0.5, 0.633, 0.733, 0.75: 0.7 two thirds of the way from 20 s to 40 s
        "fast": _curve("f", [0, 20, 40, 60], [0.5, 0.7, 0.7, 0.8]),
        "never": _curve("n", [0, 10, 20, 30], [0.5, 0.5, 0.5, 0.5]),
    }
    target, speed = speedups(curves)
    assert target == pytest.approx(0.7)
    assert speed["diffusionnft"] == pytest.approx(1.0)
    assert speed["fast"] == pytest.approx(150 / (20 + 20 * 2 / 3), rel=1e-6)
    assert speed["never"] == 0.0
    assert ranking(curves) == ["fast", "diffusionnft", "never"]
    flat = {"diffusionnft": _curve("d", [0, 50], [0.5, 0.5]), "fast": curves["fast"]}
    assert all(math.isnan(x) for x in speedups(flat)[1].values())  # nothing to reach: no ratio


TINY = Task(prompts="shapes_count", held_out=5, eval_seeds=1, eval_every=1, iterations=2, prompts_per_iteration=2,
            pool=4, keep=2, draft_steps=1, full_steps=2, lora_rank=2, lora_alpha=2.0, micro_batch=8)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_the_bf16_arm_is_there_where_the_cpu_has_native_bf16(monkeypatch, native_bf16):
    import miniature

    monkeypatch.setattr(miniature, "cpu_has_native_bf16", lambda: native_bf16)
    five = {"sol_rl_nvfp4", "sol_rl_int8", "diffusionnft", "naive_scaling", "naive_quant"}
    assert set(paper_arms(TINY)) == five | ({"sol_rl_bf16"} if native_bf16 else set())


def test_arms_are_deterministic_for_a_seed_and_learn_differently(monkeypatch):
    arms = paper_arms(TINY)
    arms.pop("sol_rl_bf16", None)  # the same machinery as the other Sol-RL arms, and not on every CPU
    assert arms["diffusionnft"].n(TINY) == TINY.keep and not arms["diffusionnft"].regenerate
    assert arms["naive_quant"].backend == arms["sol_rl_nvfp4"].backend == "emulated"
    runs = [run_arms(arms, TINY, threads=1, log=lambda _: None) for _ in range(2)]
    (a, facts), (b, _) = runs
    for name in arms:
        assert a[name].iteration == b[name].iteration == [0, 1, 2]
        assert a[name].reward == b[name].reward and a[name].train_reward == b[name].train_reward
        assert all(s > 0 for s in a[name].seconds[1:])
    assert facts["iterations_done"] == 2 and len(facts["held_out_prompts"]) == 5
    # Before any update every arm samples the same held-out images; the updates then differ.
    assert len({a[n].reward[0] for n in arms}) == 1
    assert len({a[n].reward[-1] for n in arms}) > 1
    with pytest.raises(ValueError, match="held_out"):
        run_arms({"x": arms["diffusionnft"]}, replace(TINY, held_out=45), threads=1, log=lambda _: None)


def test_report_only_rewrites_the_tables_from_the_stored_runs(tmp_path, capsys):
    """--report-only trains nothing: it renders the stored run of a seed, ranked against the stored runs
    of other seeds over the arms both have (here seed 1 lacks an arm, as on a CPU without native bf16)."""
    import convergence

    arms = {k: v for k, v in paper_arms(TINY).items() if k in ("diffusionnft", "naive_scaling", "sol_rl_int8")}
    curves, facts = run_arms(arms, TINY, threads=1, log=lambda _: None)
    for seed, names in ((0, list(arms)), (1, ["diffusionnft", "naive_scaling"])):
        data = {"seed": seed, "facts": facts, "curves": {n: asdict(curves[n]) for n in names}}
        (tmp_path / f"convergence_seed{seed}.json").write_text(json.dumps(data))
    convergence.main(["--report-only", "--out-dir", str(tmp_path)])
    text = (tmp_path / "convergence.md").read_text()
    assert (tmp_path / "convergence.png").stat().st_size > 0 and text == capsys.readouterr().out.rstrip("\n") + "\n"
    for name in arms:
        assert f"| {curves[name].label} |" in text
    shared = [n for n in convergence.ranking(curves) if n != "sol_rl_int8"]
    assert ("Seed 1 ranks them: " + " > ".join(curves[n].label for n in shared)
            + " (the same order of the arms both runs have).") in text
    with pytest.raises(SystemExit, match="no stored run of seed 7"):
        convergence.main(["--report-only", "--seed", "7", "--out-dir", str(tmp_path)])
