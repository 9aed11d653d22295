"""Peak memory of a piece of model code, counted on the meta device (shapes only: no weights, no memory).

The code runs for real (the family's own diffusers forward, peft's LoRA layers, autograd), only on
meta tensors; every tensor an op allocates is counted until the last tensor using its storage is
gone (tensors saved for backward stay alive inside autograd and are counted as long as they are
held). Weights and other tensors that exist before the traced code are not counted: views of them
are recognised from the ops' alias annotations.

Attention: `F.scaled_dot_product_attention` decomposes into the math path on meta (an L x S score
matrix per head). GPUs run fused kernels (flash / memory-efficient attention) that save only the
output and the log-sum-exp, so by default the trace stands a shape-faithful fused kernel in for it.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of storages allocated by ops while active; `peak` is the high-water mark."""

    def __init__(self) -> None:
        super().__init__()
        self._refs: dict[int, list[int]] = {}  # storage key -> [live tensors, bytes]
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = any(r.alias_info is not None for r in func._schema.returns)  # views, in-place ops
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t, fresh=not aliases)
        return out

    def _track(self, t: torch.Tensor, fresh: bool) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._refs.get(key)
        if entry is None:
            if not fresh:
                return  # a view of a tensor made before tracing (a weight, an input)
            entry = self._refs[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]


class _FusedAttention(torch.autograd.Function):
    """Flash / memory-efficient attention as memory sees it: output + fp32 log-sum-exp saved."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, *args, **kwargs):
    return _FusedAttention.apply(query, key, value)


@contextmanager
def fused_attention():
    """Stand the fused kernel in for F.scaled_dot_product_attention (a patch of the module
    attribute, so activation-checkpointing recomputation inside backward sees it too)."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass(frozen=True)
class Trace:
    peak: int  # bytes: high-water mark of tensors allocated inside
    held: int  # bytes still alive when the traced code returned (e.g. its outputs)


def trace_peak(fn: Callable[[], object], fused: bool = True) -> Trace:
    """Run `fn` (on meta tensors) and return the peak bytes it allocated."""
    counter = LiveTensorBytes()
    with ExitStack() as stack:
        if fused:
            stack.enter_context(fused_attention())
        stack.enter_context(counter)
        result = fn()
        held = counter.live
    del result
    return Trace(counter.peak, held)
