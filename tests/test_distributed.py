"""Scale-out: `torchrun --nproc_per_node 2` (gloo, CPU) trains the same model one process does."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
from model_factories import build_sana, save_pipeline
from safetensors.torch import load_file
from test_train_loop import SMALL

from solrl_core.bundled import training_graph
from solrl_core.run import main

ROOT = Path(__file__).resolve().parent.parent


def _latest(run_dir: Path):
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / name / "weights.safetensors")


def test_two_ranks_match_one_process(tmp_path):
    model = save_pipeline(build_sana(seed=1, with_vae=False, sample_size=8), tmp_path / "pix")
    wf = tmp_path / "wf.json"
    # batch_size 6 = one prompt's drafts: one process and each of two ranks batch the same samples
    # together. W4A4 quantizes activations with one amax per call, so an explorer draft depends on
    # the other drafts in its batch (as on a GPU with Transformer Engine).
    wf.write_text(json.dumps(training_graph(replace(SMALL, model=str(model), iterations=2, prompts_per_iteration=2,
                                                    micro_batch=2, batch_size=6))))
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main([str(wf), "--run-dir", str(single)]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "solrl_core.run", str(wf), "--run-dir", str(multi), "--threads", "1"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows_1 = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    rows_2 = [json.loads(x) for x in (multi / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_1) == len(rows_2) == 2
    for a, b in zip(rows_1, rows_2):  # the same samples and rewards, gathered over both processes
        for key in ("draft_reward_mean", "draft_reward_max", "reward_mean", "reward_min", "dropped"):
            assert abs(a[key] - b[key]) < 1e-6, (key, a[key], b[key])
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"]))
    w1, w2 = _latest(single), _latest(multi)
    assert w1.keys() == w2.keys()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 1e-5, worst
    assert any(not torch.equal(w1[k], torch.zeros_like(w1[k])) for k in w1 if ".lora_B." in k)  # it learned
