"""QuantLinear: qserve's native and torch's CPU int4/int8 kernels against the pure-torch dequantize reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qserve.errors import QServeError
from qserve.kernels import cpu_native
from qserve.kernels.packing import QuantizedWeight, QuantSpec, awq_pack, gptq_pack, quantize
from qserve.layers import quant_linear
from qserve.layers.quant_linear import QuantLinear

INT4 = {"quant_method": "qserve", "format_version": 1, "weights": "int4", "method": "rtn"}
INT8 = {"quant_method": "qserve", "format_version": 1, "weights": "int8", "method": "rtn"}


def _spec(d: dict) -> QuantSpec:
    spec = QuantSpec.from_config(d)
    assert spec is not None
    return spec


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def _reference(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), qw.dequantize(torch.float32), None if bias is None else bias.float())


@pytest.fixture(params=["cpu-native-int4", "cpu-int4"])
def int4_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each CPU int4 backend in turn: qserve's native kernel (where it runs) and torch's."""
    if request.param == "cpu-native-int4" and not cpu_native.available():
        pytest.skip("qserve's native CPU kernels do not run here")
    if request.param == "cpu-int4":
        monkeypatch.setattr(quant_linear, "native_ok", lambda qw: False)
    return str(request.param)


@pytest.mark.parametrize(("n", "k", "g"), [(64, 128, 32), (40, 256, 64), (96, 384, 128), (24, 512, 128)])
@pytest.mark.parametrize("t", [1, 3, 8, 9, 17, 70])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_cpu_kernel_matches_reference(
    n: int, k: int, g: int, t: int, dtype: torch.dtype, int4_backend: str
) -> None:
    torch.manual_seed(n + k + t)
    w = torch.randn(n, k) * 0.05
    bias = torch.randn(n)
    qw = quantize(w.to(dtype), "int4", g)
    layer = QuantLinear(k, n, True, _spec({**INT4, "group_size": g}), dtype, "cpu")
    layer.load([{**qw.tensors(), "bias": bias}])
    assert layer.backend == int4_backend
    x = torch.randn(t, k).to(dtype)
    y = layer(x)
    assert y.shape == (t, n) and y.dtype == dtype
    # the CPU kernel computes in bfloat16: allow bf16 rounding of inputs, scales and outputs
    assert _rel_err(y, _reference(x, qw, bias.to(dtype))) < 1e-2


@pytest.fixture(params=["cpu-native-int8", "cpu-int8"])
def int8_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each CPU int8 backend in turn: qserve's native kernel (where it runs) and torch's."""
    if request.param == "cpu-native-int8" and not cpu_native.available():
        pytest.skip("qserve's native CPU kernels do not run here")
    if request.param == "cpu-int8":
        monkeypatch.setattr(quant_linear, "native_ok", lambda qw: False)
    return str(request.param)


@pytest.mark.parametrize(("n", "k"), [(64, 128), (40, 96)])
@pytest.mark.parametrize("t", [1, 8, 9, 33])
def test_int8_cpu_kernel_matches_reference(n: int, k: int, t: int, int8_backend: str) -> None:
    torch.manual_seed(t)
    qw = quantize(torch.randn(n, k) * 0.05, "int8")
    layer = QuantLinear(k, n, False, _spec(INT8), torch.float32, "cpu")
    layer.load([qw.tensors()])
    assert layer.backend == int8_backend
    x = torch.randn(t, k)
    assert _rel_err(layer(x), _reference(x, qw, None)) < 1e-2


def test_fused_shards_concatenate_along_output() -> None:
    torch.manual_seed(0)
    parts = [quantize(torch.randn(n, 64) * 0.1, "int4", 32) for n in (32, 16, 16)]
    layer = QuantLinear(64, 64, False, _spec({**INT4, "group_size": 32}), torch.float32, "cpu")
    layer.load([p.tensors() for p in parts])
    x = torch.randn(5, 64)
    ref = torch.cat([_reference(x, p, None) for p in parts], dim=-1)
    assert _rel_err(layer(x), ref) < 1e-2


def test_reference_backend_for_groups_the_cpu_kernel_rejects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant_linear, "native_ok", lambda qw: False)
    qw = quantize(torch.randn(32, 64), "int4", 16)
    layer = QuantLinear(64, 32, False, _spec({**INT4, "group_size": 16}), torch.float32, "cpu")
    layer.load([qw.tensors()])
    assert layer.backend == "reference"
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), _reference(x, qw, None))


@pytest.mark.skipif(not cpu_native.available(), reason="qserve's native CPU kernels do not run here")
@pytest.mark.parametrize("g", [16, 8])
def test_native_int4_takes_groups_torch_rejects(g: int) -> None:
    torch.manual_seed(g)
    qw = quantize(torch.randn(40, 96) * 0.05, "int4", g)
    layer = QuantLinear(96, 40, False, _spec({**INT4, "group_size": g}), torch.bfloat16, "cpu")
    layer.load([qw.tensors()])
    assert layer.backend == "cpu-native-int4"
    x = torch.randn(5, 96).bfloat16()
    assert _rel_err(layer(x), _reference(x, qw, None)) < 1e-2


def test_float_weight_shard_is_quantized_at_load() -> None:
    w = torch.randn(32, 64) * 0.1
    layer = QuantLinear(64, 32, False, _spec({**INT4, "group_size": 32}), torch.float32, "cpu")
    layer.load([{"weight": w}])
    x = torch.randn(4, 64)
    assert _rel_err(layer(x), x @ w.t()) < 0.1


def test_awq_and_gptq_checkpoints_load_through_repack() -> None:
    k, n, g = 128, 32, 32
    q, z = torch.randint(0, 16, (k, n)), torch.randint(1, 16, (k // g, n))
    s = (torch.rand(k // g, n) * 0.01).half()
    w = ((q.half() - z.repeat_interleave(g, 0).half()) * s.repeat_interleave(g, 0)).t().float()  # (N, K)
    x = torch.randn(2, k)
    awq = {"qweight": awq_pack(q), "qzeros": awq_pack(z), "scales": s}
    qweight, qzeros = gptq_pack(q, z)
    gptq = {"qweight": qweight, "qzeros": qzeros, "scales": s, "g_idx": torch.arange(k) // g}
    for cfg, shard in (
        ({"quant_method": "awq", "bits": 4, "group_size": g, "version": "gemm"}, awq),
        ({"quant_method": "gptq", "bits": 4, "group_size": g, "sym": False}, gptq),
    ):
        layer = QuantLinear(k, n, False, _spec(cfg), torch.float32, "cpu")
        layer.load([shard])
        assert _rel_err(layer(x), x @ w.t()) < 1e-2


def test_load_errors_are_clear() -> None:
    layer = QuantLinear(64, 32, False, _spec({**INT4, "group_size": 32}), torch.float32, "cpu")
    with pytest.raises(QServeError, match="layer expects 32x64"):
        layer.load([quantize(torch.randn(16, 64), "int4", 32).tensors()])
    with pytest.raises(QServeError, match="bad quantized weights"):
        layer.load([{"qweight": torch.zeros(32, 32, dtype=torch.uint8)}])
    with pytest.raises(RuntimeError, match="before load"):
        QuantLinear(64, 32, False, _spec(INT8), torch.float32, "cpu")(torch.randn(1, 64))


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_unaligned_checkpoint_tensors_are_safe(weights: str) -> None:
    # safetensors data sits at arbitrary byte offsets; torch's int8 CPU kernel crashes on unaligned weights
    g = 32 if weights == "int4" else -1
    qw = quantize(torch.randn(64, 64), weights, 32)
    shard: dict[str, torch.Tensor] = {}
    for name, t in qw.tensors().items():
        if t.element_size() != 1:
            shard[name] = t
            continue
        buf = torch.empty(t.numel() * t.element_size() + 1, dtype=torch.uint8)
        view = buf[1:].view(t.dtype).view(t.shape)  # 1 byte past an aligned allocation
        view.copy_(t)
        shard[name] = view
    layer = QuantLinear(
        64, 64, False, _spec({**(INT4 if weights == "int4" else INT8), "group_size": g}), torch.float32, "cpu"
    )
    layer.load([shard])
    x = torch.randn(384, 64)
    assert _rel_err(layer(x), _reference(x, qw, None)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("weights", ["int4", "int8"])
@pytest.mark.parametrize("t", [1, 16, 300])
def test_cuda_backend_matches_reference(weights: str, t: int) -> None:
    torch.manual_seed(t)
    n, k, g = 384, 512, 128
    qw = quantize(torch.randn(n, k, dtype=torch.float16) * 0.05, weights, g)
    cfg = {**(INT4 if weights == "int4" else INT8), "group_size": g if weights == "int4" else -1}
    layer = QuantLinear(k, n, False, _spec(cfg), torch.float16, "cuda")
    layer.load([qw.tensors()])
    assert layer.backend == "triton"
    x = torch.randn(t, k, dtype=torch.float16)
    assert _rel_err(layer(x.cuda()).cpu(), _reference(x, qw, None)) < 5e-3
