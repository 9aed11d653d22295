"""Checks the plan's activation traces against memory measured on the CPU, on real-width slices.

    python -m solrl_core.plan.measure FAMILY [--micro-batch B] [--resolution PX] [--json]

The same code (one NFT-update pair, one sampling step) runs twice: on a random-weight real-width
slice on the CPU, where the growth of the process's resident memory is measured, and on a
meta-device twin of the slice, where the plan traces it. The RSS high-water mark counts tensors
exactly only when large allocations come from mmap (so freed memory leaves the process at once):
glibc is told so (mallopt) for the duration of the measurement.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.base import FlowPolicy
from ..models.loading import policy_from_components
from . import activations as act
from .trace import trace_peak

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
DEFAULT_MMAP_THRESHOLD = 128 * 1024


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


@contextmanager
def mmap_allocations():
    """Large blocks straight from mmap, returned to the system when freed (glibc only)."""
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024) and libc.mallopt(M_TRIM_THRESHOLD, 0)):
        raise OSError("mallopt refused the allocation settings")
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * DEFAULT_MMAP_THRESHOLD)


def rss_growth(fn) -> int:
    """Peak growth of resident memory while `fn` runs (Linux: resets VmHWM through clear_refs)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base


def meta_twin(policy: FlowPolicy) -> FlowPolicy:
    """The same policy with its transformer and VAE rebuilt from their configs on the meta device."""
    components = {name: None for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                                          "tokenizer_2", "tokenizer_3")}
    components.update(transformer=_on_meta(policy.transformer), vae=_on_meta(getattr(policy, "vae", None)),
                      scheduler=getattr(policy, "scheduler", None))
    settings = {"resolution": policy.resolution, "max_sequence_length": policy.max_sequence_length}
    if policy.family == "sana":
        settings["complex_human_instruction"] = ()
    return policy_from_components(policy.family, components, act.META, policy.dtype, "meta twin", **settings)


def _on_meta(module):
    if module is None:
        return None
    with torch.device(act.META):
        twin = type(module).from_config(module.config)
    return twin.to(next(module.parameters()).dtype).requires_grad_(False)


@dataclass(frozen=True)
class Comparison:
    what: str
    measured: int  # bytes, CPU resident-memory growth
    estimated: int  # bytes, meta-device trace

    @property
    def ratio(self) -> float:
        return self.estimated / self.measured


def compare(policy: FlowPolicy, micro_batch: int, sample_batch: int, options: act.UpdateOptions) -> list[Comparison]:
    """Measured against traced bytes for one sampling step and one update pair of `policy` (on CPU)."""
    twin = meta_twin(policy)
    with mmap_allocations():
        sampling = act.sampling_step(policy, policy.transformer, sample_batch)
        sampling()  # warm-up: lazily built buffers (RoPE tables, caches) are not per-call memory
        out = [Comparison("sampling step", rss_growth(sampling),
                          trace_peak(act.sampling_step(twin, twin.transformer, sample_batch)).peak)]
        act.prepare_trained(policy, options)
        act.prepare_trained(twin, options)
        pair = act.update_pair(policy, micro_batch, options)
        pair()
        out.append(Comparison("update pair", rss_growth(pair),
                              trace_peak(act.update_pair(twin, micro_batch, options)).peak))
    return out


def run(family: str, micro_batch: int, sample_batch: int, resolution: int, threads: int | None = None,
        depth: dict[str, int] | None = None) -> list[Comparison]:
    """Build the family's real-width slice and compare (threads: torch CPU threads, default as set)."""
    from ..models.slices import build_slice

    if threads:
        torch.set_num_threads(threads)
    policy = build_slice(family, depth=depth, resolution=(resolution, resolution))
    return compare(policy, micro_batch, sample_batch, act.UpdateOptions())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=("sana", "flux", "sd3"))
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--sample-batch", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="more threads add per-thread CPU kernel scratch")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = run(args.family, args.micro_batch, args.sample_batch, args.resolution, args.threads)
    if args.json:
        print(json.dumps([{"what": r.what, "measured": r.measured, "estimated": r.estimated} for r in rows]))
    else:
        for r in rows:
            print(f"{args.family} {r.what}: measured {r.measured / 2**20:.1f} MiB, traced {r.estimated / 2**20:.1f} MiB "
                  f"({r.ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
