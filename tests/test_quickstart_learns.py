"""The quickstart learns: a shorter deterministic variant of it (same graph, model, reward and
settings; fewer iterations) raises both the training reward and the held-out reward."""
from __future__ import annotations

import json
from dataclasses import replace
from statistics import mean

import pytest
import torch

from solrl_core.bundled import QUICKSTART, training_graph
from solrl_core.run import main

# The first 15 of the quickstart's 30 iterations; the held-out reward (15 single-object prompts x 4
# fixed seeds) is measured before the first update and after the fourteenth.
SHORT = replace(QUICKSTART, iterations=15, eval_every=14)


@pytest.mark.slow  # 15 training iterations with held-out evaluations: minutes on 2 cores
def test_quickstart_variant_raises_the_reward(tmp_path):
    wf = tmp_path / "quickstart_short.json"
    wf.write_text(json.dumps(training_graph(SHORT)))
    threads = torch.get_num_threads()
    try:
        assert main([str(wf), "--run-dir", str(tmp_path / "run"), "--threads", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(15))
    first, last = mean(r["reward_mean"] for r in rows[:3]), mean(r["reward_mean"] for r in rows[-3:])
    held_out = [r["eval_reward_mean"] for r in rows if "eval_reward_mean" in r]
    assert len(held_out) == 2
    assert last >= first + 0.01, (first, last)
    assert held_out[1] >= held_out[0] + 0.02, held_out
