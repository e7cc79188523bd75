"""qserve::moe_experts (grouped by expert) against the token-by-token reference, float and quantized."""

from __future__ import annotations

import pytest
import torch

from qserve.kernels.moe import moe_experts, moe_experts_ref
from qserve.kernels.packing import QuantSpec, quantize
from qserve.layers.moe import FusedMoE


def _experts(e: int, h: int, i: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * i, h, generator=g) * 0.2, torch.randn(e, h, i, generator=g) * 0.2


def _routing(t: int, k: int, e: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.empty(0, k)
    return ids.long(), torch.rand(t, k, generator=g)


@pytest.mark.parametrize(
    ("t", "e", "k", "h", "i"),
    [
        (1, 2, 1, 16, 8),
        (7, 4, 2, 64, 32),
        (33, 8, 2, 32, 48),
        (64, 16, 4, 64, 16),
        (5, 64, 8, 32, 32),
        (0, 4, 2, 16, 8),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_matches_reference(t: int, e: int, k: int, h: int, i: int, dtype: torch.dtype) -> None:
    w13, w2 = _experts(e, h, i)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(2)).to(dtype)
    ids, w = _routing(t, k, e)
    out = moe_experts(x, ids, w, w13.to(dtype), w2.to(dtype))
    ref = moe_experts_ref(x, ids, w, w13.to(dtype), w2.to(dtype))
    assert out.shape == (t, h) and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_invalid_ids_are_dropped_and_rows_independent() -> None:
    """Padded rows (ids -1 or >= E, or NaN activations) change nothing for the other rows."""
    w13, w2 = _experts(4, 32, 16)
    x = torch.randn(6, 32)
    ids, w = _routing(6, 2, 4)
    base = moe_experts(x, ids, w, w13, w2)
    ids2, x2 = ids.clone(), x.clone()
    ids2[2] = torch.tensor([-1, 4])  # a padded row: no expert
    x2[4] = float("nan")  # garbage in another padded row
    out = moe_experts(x2, ids2, w, w13, w2)
    assert torch.equal(out[2], torch.zeros(32))
    keep = [0, 1, 3, 5]
    torch.testing.assert_close(out[keep], base[keep], atol=1e-6, rtol=1e-5)  # GEMM blocking may differ
    assert torch.isnan(out[4]).all()


@pytest.mark.parametrize(("weights", "group"), [("int8", -1), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("t", [1, 3, 40])
def test_quantized_experts_match_dequantized_reference(weights: str, group: int, t: int) -> None:
    e, h, i, k = 8, 128, 64, 2
    w13, w2 = _experts(e, h, i, seed=t)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(3))
    ids, w = _routing(t, k, e)
    tensors = {}
    for j in range(e):
        tensors[f"{j}.w1.weight"], tensors[f"{j}.w3.weight"] = w13[j, :i], w13[j, i:]
        tensors[f"{j}.w2.weight"] = w2[j]
    dq13 = torch.stack([quantize(m, weights, group).dequantize(torch.float32) for m in w13])
    dq2 = torch.stack([quantize(m, weights, group).dequantize(torch.float32) for m in w2])
    ref = moe_experts_ref(x, ids, w, dq13, dq2)
    for device_kind in ("cpu", "reference"):
        layer = FusedMoE(e, h, i, QuantSpec("qserve", weights, group), torch.float32, torch.device("cpu"))
        layer.load_named(tensors)
        assert layer.kind == f"cpu-{weights}"
        if device_kind == "reference":  # qserve's layout as stored (the non-CPU path), via quant_matmul
            q13 = [quantize(m, weights, group) for m in w13]
            q2 = [quantize(m, weights, group) for m in w2]
            layer.set_quantized(q13, q2, keep_layout=True)
            assert layer.kind == weights
        out = layer(x, ids, w)
        tol = 2e-2 * float(ref.abs().max()) + 1e-3 if device_kind == "cpu" else 1e-4  # cpu kernels: bf16
        torch.testing.assert_close(out, ref, atol=tol, rtol=0)


def test_int4_layout_is_smaller_than_float() -> None:
    w13, w2 = _experts(4, 128, 64)
    tensors = {
        f"{j}.{p}.weight": t
        for j in range(4)
        for p, t in (("gate_proj", w13[j, :64]), ("up_proj", w13[j, 64:]), ("down_proj", w2[j]))
    }
    f = FusedMoE(4, 128, 64, None, torch.bfloat16, torch.device("cpu"))
    f.load_named(tensors)
    q = FusedMoE(4, 128, 64, QuantSpec("qserve", "int4", 64), torch.bfloat16, torch.device("cpu"))
    q.load_named(tensors)
    assert f.nbytes == 4 * 3 * 128 * 64 * 2
    assert q.nbytes < 0.33 * f.nbytes  # 0.5 B codes + bf16 scale pairs per 64 weights


def test_errors() -> None:
    w13, w2 = _experts(4, 16, 8)
    x, (ids, w) = torch.randn(3, 16), _routing(3, 2, 4)
    with pytest.raises(ValueError, match="unknown kind"):
        moe_experts(x, ids, w, w13, w2, kind="fp8", inter=8)
    with pytest.raises(ValueError, match="x must be"):
        moe_experts(x[None], ids, w, w13, w2)
    with pytest.raises(TypeError, match="topk_ids must be int"):
        moe_experts(x, ids.float(), w, w13, w2)
    with pytest.raises(ValueError, match="topk_weights"):
        moe_experts(x, ids, w[:, :1], w13, w2)
    with pytest.raises(ValueError, match="float experts need"):
        moe_experts(x, ids, w, w13[:, :10], w2)
    with pytest.raises(ValueError, match="needs inter"):
        moe_experts(x, ids, w, w13, w2, kind="int8")
    layer = FusedMoE(4, 16, 8, None, torch.float32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="before load_named"):
        layer(x, ids, w)
    from qserve.errors import QServeError

    with pytest.raises(QServeError, match="lacks the up projection of expert 0"):
        layer.load_named({"0.gate_proj.weight": w13[0, :8]})
    with pytest.raises(QServeError, match="expert 7 in the checkpoint"):
        layer.load_named({"7.gate_proj.weight": w13[0, :8]})
    with pytest.raises(QServeError, match="do not match"):
        layer.load_named({"gate_up_proj": w13[:, :4], "down_proj": w2})


def test_compiles_without_graph_breaks() -> None:
    w13, w2 = _experts(4, 32, 16)
    x, (ids, w) = torch.randn(5, 32), _routing(5, 2, 4)

    def f(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return moe_experts(x, ids, w, w13, w2) * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, ids, w), f(x, ids, w))
