"""The fused-MoE Triton kernel (float, int8, int4 experts) in Triton's interpreter, against the reference."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from qserve.kernels.fused_moe import align_blocks, fused_moe_triton
from qserve.kernels.moe import moe_experts, moe_experts_ref
from qserve.kernels.packing import quantize
from qserve.kernels.quant_matmul_configs import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _case(t: int, e: int, k: int, h: int, i: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w13, w2 = torch.randn(e, 2 * i, h, generator=g) * 0.2, torch.randn(e, h, i, generator=g) * 0.2
    x = torch.randn(t, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k)
    return x, ids.long(), torch.rand(t, k, generator=g), w13, w2


@pytest.mark.parametrize(("e", "block"), [(1, 16), (4, 16), (8, 4), (16, 32)])
@pytest.mark.parametrize("t", [0, 1, 5, 40])
def test_align_blocks(e: int, block: int, t: int) -> None:
    k = min(2, e)
    _, ids, _, _, _ = _case(t, e, k, 8, 8, seed=t + e)
    if t > 2:
        ids[1, 0] = -1  # a padded row's slot: no block
        ids[2, k - 1] = e  # out of range too
    sorted_ids, expert_ids = align_blocks(ids, e, block)
    a = ids.numel()
    assert sorted_ids.numel() % block == 0 and sorted_ids.numel() >= a + e * (block - 1)
    assert expert_ids.numel() == sorted_ids.numel() // block
    flat = ids.reshape(-1)
    got: dict[int, list[int]] = {}
    for b, ex in enumerate(expert_ids.tolist()):
        blk = sorted_ids[b * block : (b + 1) * block].tolist()
        if ex < 0:
            assert all(v == a for v in blk)
            continue
        real = [v for v in blk if v < a]
        assert all(int(flat[v]) == ex for v in real)
        got.setdefault(ex, []).extend(real)
    for ex in range(e):  # every valid assignment exactly once, in token order, under its expert
        want = [j for j in range(a) if int(flat[j]) == ex]
        assert got.get(ex, []) == want
    assert expert_ids.tolist() == sorted(expert_ids.tolist(), key=lambda v: (v < 0, v))  # runs in order


SHAPES = [(1, 4, 1, 32, 32), (7, 4, 2, 64, 32), (20, 8, 2, 32, 64), (3, 16, 4, 64, 32), (9, 8, 8, 32, 32)]


@needs_triton
@pytest.mark.parametrize(("t", "e", "k", "h", "i"), SHAPES)
@pytest.mark.parametrize(("kind", "group"), [("float", -1), ("int8", -1), ("int4", 32), ("int4", 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_matches_reference(
    interpret: None, t: int, e: int, k: int, h: int, i: int, kind: str, group: int, dtype: torch.dtype
) -> None:
    x, ids, w, w13, w2 = _case(t, e, k, h, i, seed=t * 7 + e)
    x = x.to(dtype)
    if t > 3:
        ids[2] = -1  # a padded row
    if kind == "float":
        a13, a2 = w13.to(dtype), w2.to(dtype)
        extra: dict[str, torch.Tensor | None] = {}
        ref = moe_experts_ref(x, ids, w, a13, a2)
    else:
        sdt = (
            torch.float32 if group == 32 else dtype
        )  # the checkpoint's dtype (float32 from a float32 source)
        q13 = [quantize(m, kind, group, scale_dtype=sdt) for m in w13]
        q2 = [quantize(m, kind, group, scale_dtype=sdt) for m in w2]
        a13, a2 = torch.stack([q.qweight for q in q13]), torch.stack([q.qweight for q in q2])
        extra = {
            "w13_scales": torch.stack([q.scales for q in q13]),
            "w2_scales": torch.stack([q.scales for q in q2]),
            "w13_zeros": torch.stack([q.zeros for q in q13]) if kind == "int4" else None,  # type: ignore[misc]
            "w2_zeros": torch.stack([q.zeros for q in q2]) if kind == "int4" else None,  # type: ignore[misc]
        }
        dq13 = torch.stack([q.dequantize(dtype) for q in q13])
        dq2 = torch.stack([q.dequantize(dtype) for q in q2])
        ref = moe_experts_ref(x, ids, w, dq13, dq2)
    out = fused_moe_triton(x, ids, w, a13, a2, kind, i, group_size=group, **extra)
    assert out.shape == (t, h) and out.dtype == dtype
    assert not out.isnan().any()
    # 16-bit intermediates (gate/up output, SiLU product) against a float32 reference: a relative error
    # bound. The interpreter casts float32 -> bfloat16 by truncation (numpy has no bf16), not by rounding as
    # a GPU does, so its bf16 results are biased towards zero: a looser bound there.
    scale = float(ref.float().abs().max()) if t else 1.0
    rel = 3e-3 if dtype == torch.float16 else 2.5e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=10 * rel * scale + 1e-3, rtol=0)
    if t:
        assert float((out.float() - ref.float()).norm() / ref.float().norm()) < rel
    if t > 3:
        assert torch.equal(out[2], torch.zeros(h, dtype=out.dtype))
    # the public op takes this kernel too under the interpreter (16-bit activations)
    via_op = moe_experts(x, ids, w, a13, a2, kind=kind, inter=i, group_size=group, **extra)
    torch.testing.assert_close(via_op, out, atol=0, rtol=0)


@needs_triton
def test_fused_errors(interpret: None) -> None:
    x, ids, w, w13, w2 = _case(3, 4, 2, 32, 16, seed=0)
    with pytest.raises(ValueError, match="float, int8 or int4"):
        fused_moe_triton(x.bfloat16(), ids, w, w13, w2, "cpu-int4", 16)
    with pytest.raises(ValueError, match="x must be"):
        moe_experts(x.bfloat16()[None], ids, w, w13.bfloat16(), w2.bfloat16())


def test_fp32_activations_take_the_grouped_loop(interpret: None) -> None:
    x, ids, w, w13, w2 = _case(5, 4, 2, 32, 16, seed=3)
    torch.testing.assert_close(moe_experts(x, ids, w, w13, w2), moe_experts_ref(x, ids, w, w13, w2))
