"""benchmarks/gpu.py: its dry run exercises every section on the CPU with only the packages the GPU
machine has (no torchvision, open_clip, Transformer Engine or torchao); without CUDA the real run
says so and writes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Packages the GPU machine does not have: a None entry in sys.modules makes their import fail.
ABSENT = ("torchvision", "open_clip", "transformer_engine", "torchao")
LAUNCH = ("import runpy, sys; sys.modules.update(dict.fromkeys({absent!r})); sys.argv = {argv!r}; "
          "sys.exit(runpy.run_path({script!r}, run_name='__main__'))")


def _run(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    script = str(ROOT / "benchmarks" / "gpu.py")
    code = LAUNCH.format(absent=ABSENT, argv=[script, *argv], script=script)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_dry_run_covers_every_section(tmp_path):
    res = _run("--dry-run", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["dry_run"] and (tmp_path / "gpu.md").read_text().startswith("# GPU checks")
    layers = result["explorer_layers"]
    assert {r["family"] for r in layers} == {"sana", "flux", "sd3"}
    for r in layers:  # on a CPU: the emulated reference and cpu_int8 against the exact product
        assert 0.01 < r["emulated_vs_exact"] < 0.3 and r["cpu_int8_vs_exact"] < 0.05, r
        assert r["torchao_fp8"] == r["nvfp4_bits"] == "needs CUDA"
    rollout = result["rollout"]
    assert [(r["family"], r["backend"]) for r in rollout] == [("sana", "cpu_int8"), ("flux", "cpu_int8")]
    assert all(r["bf16_step_s"] > 0 and r["explorer_step_s"] > 0 and r["quantized_layers"] > 0 for r in rollout)
    it = result["iteration"]
    assert it["backend"] == "cpu_int8" and it["measured_peak_bytes"] > 0 and it["planned_peak_bytes"] > 0
    assert sum(it["planned_components"].values()) == it["planned_peak_bytes"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_nothing_is_measured_or_written(tmp_path):
    res = _run("--out", str(tmp_path / "out"))
    assert res.returncode == 0 and "no CUDA device" in res.stdout
    assert not (tmp_path / "out").exists()
