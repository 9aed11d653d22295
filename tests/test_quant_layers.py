"""Quantized linear layers and backend selection."""
from __future__ import annotations

import pytest
import torch

from solrl_core.quant import Int8DynamicLinear, NVFP4Linear, quantize, select_backend
from solrl_core.quant import backends as backends_mod


def _w4a4_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile) -> torch.Tensor:
    """(dequantized unscaled A) @ (dequantized unscaled W)^T * alpha + bias, in float64, rows of x."""
    k = weight.shape[1]
    qa, qw = quantize(x.reshape(-1, k)), quantize(weight.reshape(weight.shape[0], k), tile)
    alpha = qa.amax.double() * qw.amax.double() / (6 * 6 * 448 * 448)
    ref = (qa.dequantize_unscaled().double() @ qw.dequantize_unscaled().double().T) * alpha
    return ref if bias is None else ref + bias.double()


def _max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("tile", [(1, 16), (16, 16)])
@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_w4a4_equals_dequantize_matmul_alpha(tile, cache, with_bias):
    lin = torch.nn.Linear(128, 64, bias=with_bias)
    x = torch.randn(4, 7, 128) * 3
    layer = NVFP4Linear(lin.weight, lin.bias, "blk.ff", tile=tile, cache_dequantized=cache)
    ref = _w4a4_reference(x, lin.weight, lin.bias, tile)
    out = layer(x).reshape(-1, 64)
    assert _max_rel(out, ref) < 1e-6
    # Same thing through the fully dequantized operands.
    qa, qw = quantize(x.reshape(-1, 128)), quantize(lin.weight, tile)
    deq = qa.dequantize() @ qw.dequantize().T + (0 if lin.bias is None else lin.bias)
    assert torch.allclose(out.float(), deq, rtol=1e-5, atol=1e-5 * deq.abs().max().item())
    assert layer.input_amax.item() == x.abs().max().item()


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("side", [(5, 4), (8, 8)])
def test_pointwise_conv_w4a4_reference(channels_last, with_bias, cache, side):
    """The 1x1-conv path (its own GEMM kernel; alpha folded into the output for 60 tokens, into the
    weight for 192, fewer / more than the 64 input channels) against the same float64 reference; the
    output keeps the input's memory layout."""
    conv = torch.nn.Conv2d(64, 48, 1, bias=with_bias)
    x = torch.randn(3, 64, *side) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    layer = NVFP4Linear(conv.weight, conv.bias, "ff.conv_inverted", tile=(16, 16), cache_dequantized=cache,
                        pointwise_conv=True)
    out = layer(x)
    assert out.shape == (3, 48, *side)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)
    ref = _w4a4_reference(x.movedim(1, -1), conv.weight, conv.bias, (16, 16))
    assert _max_rel(out.movedim(1, -1).reshape(-1, 48), ref) < 1e-6
    assert ((out - conv(x)).norm() / conv(x).norm()).item() < 0.25
    out_bf16 = layer(x.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    assert _max_rel(out_bf16.movedim(1, -1).reshape(-1, 48), _w4a4_reference(
        x.bfloat16().movedim(1, -1), conv.weight, conv.bias, (16, 16))) < 1e-2


def test_w4a4_scratch_reuse_and_threads():
    """Activations go through a per-thread scratch buffer: outputs must not alias it, and layers
    running in two threads at once must not see each other's activations."""
    import threading

    weights, biases = [torch.randn(32, 64) for _ in range(2)], [torch.randn(32) for _ in range(2)]
    layers = [NVFP4Linear(weights[i], biases[i], f"l{i}", cache_dequantized=True) for i in range(2)]
    inputs = [torch.randn(50, 64) * (i + 1) for i in range(2)]
    expected = [_w4a4_reference(inputs[i], weights[i], biases[i], (1, 16)) for i in range(2)]
    first = layers[0](inputs[0])
    layers[1](inputs[1])
    assert _max_rel(first, expected[0]) < 1e-6  # not overwritten by the second call
    errors: list[float] = []

    def worker(i: int) -> None:
        for _ in range(30):
            errors.append(_max_rel(layers[i](inputs[i]), expected[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 60 and max(errors) < 1e-6


def test_w4a4_keeps_dtype_and_bias_free_path():
    lin = torch.nn.Linear(64, 32, bias=False)
    layer = NVFP4Linear(lin.weight, None, "x")
    for dtype in (torch.float32, torch.bfloat16):
        y = layer(torch.randn(5, 64, dtype=dtype))
        assert y.dtype == dtype and y.shape == (5, 32)


def test_activation_error_names_layer():
    layer = NVFP4Linear(torch.randn(16, 32), None, "transformer_blocks.3.attn.to_k")
    with pytest.raises(ValueError, match="transformer_blocks.3.attn.to_k.*NaN"):
        layer(torch.full((2, 32), float("nan")))


def test_cpu_int8_close_to_fp32():
    lin = torch.nn.Linear(256, 128)
    layer = Int8DynamicLinear(lin.weight, lin.bias, "x")
    x = torch.randn(8, 256)
    ref = lin(x)
    rel = ((layer(x) - ref).norm() / ref.norm()).item()
    assert rel < 0.03
    assert layer.weight_nbytes == 256 * 128 + 4 * 128


@pytest.mark.parametrize(
    "device,cap,te,expected",
    [
        ("cpu", None, False, "emulated"),
        ("cpu", None, True, "emulated"),
        ("cuda", (10, 0), True, "te_nvfp4"),
        ("cuda", (12, 0), True, "te_nvfp4"),
        ("cuda", (9, 0), True, "te_fp8"),
        ("cuda", (8, 9), True, "te_fp8"),
        ("cuda", (8, 0), True, "emulated"),
        ("cuda", (10, 0), False, "emulated"),
    ],
)
def test_auto_backend_selection(monkeypatch, device, cap, te, expected):
    monkeypatch.setattr(backends_mod, "transformer_engine_available", lambda: te)
    choice = select_backend("auto", device, capability=cap)
    assert choice.name == expected and choice.reason


def test_explicit_backend_checks(monkeypatch):
    monkeypatch.setattr(backends_mod, "transformer_engine_available", lambda: False)
    assert select_backend("cpu_int8", "cpu").name == "cpu_int8"
    assert select_backend("none", "cpu").name == "none"
    with pytest.raises(ValueError, match="CUDA"):
        select_backend("te_nvfp4", "cpu")
    with pytest.raises(ValueError, match="10.0"):
        select_backend("te_nvfp4", "cuda", capability=(9, 0))
    with pytest.raises(ValueError, match="transformer_engine"):
        select_backend("te_fp8", "cuda", capability=(9, 0))
    with pytest.raises(ValueError, match="unknown"):
        select_backend("fp3", "cpu")


def test_cpu_bf16_is_explicit_cpu_only_and_needs_native_bf16(monkeypatch):
    monkeypatch.setattr(backends_mod, "cpu_has_native_bf16", lambda: True)
    assert select_backend("cpu_bf16", "cpu").name == "cpu_bf16"
    assert select_backend("auto", "cpu").name == "emulated"  # never chosen for the user
    with pytest.raises(ValueError, match="'cpu_bf16' runs on CPU only"):
        select_backend("cpu_bf16", "cuda", capability=(10, 0))
    monkeypatch.setattr(backends_mod, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ValueError, match="native bf16.*use cpu_int8") as err:
        select_backend("cpu_bf16", "cpu")
    assert "\n" not in str(err.value)


def test_transformer_engine_import_failure_is_caught(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name.startswith("transformer_engine"):
            raise RuntimeError("no CUDA")  # what TE really raises on CPU machines
        return real_import(name, *args, **kwargs)

    backends_mod.import_transformer_engine.cache_clear()
    monkeypatch.setattr(builtins, "__import__", failing)
    try:
        assert backends_mod.import_transformer_engine() is None
    finally:
        backends_mod.import_transformer_engine.cache_clear()


def _gpu_with(min_cap: tuple[int, int]) -> bool:
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() >= min_cap
            and backends_mod.transformer_engine_available())


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_with((10, 0)), reason="needs sm_100+ and transformer_engine")
def test_te_nvfp4_matches_emulated():
    from solrl_core.quant import TELinear

    lin = torch.nn.Linear(256, 128, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    te_layer = TELinear(lin.weight, lin.bias, "te_nvfp4", "x", tile=(16, 16))
    emu = NVFP4Linear(lin.weight, lin.bias, "x", tile=(16, 16))
    a, b = te_layer(x).float(), emu(x).float()
    assert ((a - b).norm() / b.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_with((8, 9)), reason="needs sm_89+ and transformer_engine")
def test_te_fp8_close_to_bf16():
    from solrl_core.quant import TELinear

    lin = torch.nn.Linear(256, 128, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    layer = TELinear(lin.weight, lin.bias, "te_fp8", "x")
    ref = lin(x).float()
    assert ((layer(x).float() - ref).norm() / ref.norm()).item() < 0.1


def _projections(n: int = 3) -> tuple[list[NVFP4Linear], list[torch.Tensor]]:
    weights = [torch.randn(48, 64) for _ in range(n)]
    return [NVFP4Linear(w, None, f"attn.to_{i}", cache_dequantized=True) for i, w in enumerate(weights)], weights


def test_w4a4_reuses_the_activation_of_a_tensor_fed_to_consecutive_layers(monkeypatch):
    """to_q / to_k / to_v of one hidden state: the activation is quantized once and every output
    still equals its own reference; an in-place change in between is seen (version counter)."""
    import solrl_core.quant.layers as layers_mod

    layers, weights = _projections()
    x = torch.randn(2, 40, 64)
    calls = []
    real = layers_mod.quantize_dequantize_unscaled
    monkeypatch.setattr(layers_mod, "quantize_dequantize_unscaled", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        outs = [layer(x) for layer in layers]
        assert len(calls) == 1
        for out, w in zip(outs, weights):
            assert _max_rel(out.reshape(-1, 48), _w4a4_reference(x, w, None, (1, 16))) < 1e-6
        x.mul_(-3.0)  # same tensor object, new values
        out = layers[0](x)
        assert len(calls) == 2
        assert _max_rel(out.reshape(-1, 48), _w4a4_reference(x, weights[0], None, (1, 16))) < 1e-6
        y = x.clone()  # equal values, another tensor: quantized again
        layers[1](y)
        assert len(calls) == 3
    with torch.inference_mode():  # inference tensors have no version counter: never reused
        z = torch.randn(2, 40, 64)
        outs = [layer(z) for layer in layers[:2]]
        z.mul_(-3.0)
        outs.append(layers[2](z))
        assert len(calls) == 6
        assert _max_rel(outs[2].reshape(-1, 48), _w4a4_reference(z, weights[2], None, (1, 16))) < 1e-6


def test_w4a4_does_not_keep_large_activations(monkeypatch):
    import solrl_core.quant.layers as layers_mod
    import solrl_core.quant.nvfp4 as nvfp4

    layers, weights = _projections(2)
    monkeypatch.setattr(nvfp4, "SCRATCH_KEEP_BYTES", 1024)
    x = torch.randn(100, 64)
    out = [layer(x) for layer in layers]
    assert layers_mod._LAST_ACTIVATION.source is None and layers_mod._LAST_ACTIVATION.values is None
    for o, w in zip(out, weights):
        assert _max_rel(o, _w4a4_reference(x, w, None, (1, 16))) < 1e-6
