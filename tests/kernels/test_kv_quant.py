"""int8/int4 KV blocks: quantization error bounds, exact storage, self-contained blocks, attention paths."""

from __future__ import annotations

import pytest
import torch

from qserve.kernels.attention import (
    KVLayout,
    decode_attention_cpu,
    gather_kv,
    paged_attention_cpu,
    paged_attention_ref,
    store_kv,
)
from qserve.kernels.kv_quant import block_bytes, dequantize, quantize


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_quantize_error_bound(bits: int, d: int) -> None:
    x = torch.randn(37, 3, d) * torch.rand(37, 3, 1) * 4  # (T, H, D), rows of different ranges
    q, s, z = quantize(x, bits)
    assert q.dtype == torch.uint8 and q.shape == (37, 3, d * bits // 8)
    assert s.dtype == torch.float16 and s.shape == (37, 3)
    back = dequantize(q, s, z, bits, torch.float32)
    err = (back - x).abs()
    # half a step, plus the fp16 rounding of scale (relative 2^-11 per level) and of the zero point
    bound = (
        s.float()[..., None] * (0.5 + ((1 << bits) - 1) * 2**-11) + z.float().abs()[..., None] * 2**-10 + 1e-6
    )
    assert bool((err <= bound).all())
    # endpoints are represented (asymmetric: the row minimum is the zero point)
    torch.testing.assert_close(back.amin(-1), x.amin(-1), atol=1e-2, rtol=1e-3)


def test_constant_rows_are_exact() -> None:
    x = torch.full((4, 2, 64), 0.75)
    q, s, z = quantize(x, 4)
    assert bool((s == 0).all())
    assert torch.equal(dequantize(q, s, z, 4, torch.float32), x)


def _quant_cache(bits: int, hkv: int, nb: int, bs: int, d: int) -> torch.Tensor:
    return torch.zeros(2, hkv, nb, block_bytes(bs, d, bits), dtype=torch.uint8)


@pytest.mark.parametrize("bits", [8, 4])
def test_store_then_gather_returns_dequantized_values(bits: int) -> None:
    bs, d, hkv = 4, 64, 2
    cache = _quant_cache(bits, hkv, 6, bs, d)
    layout = KVLayout(bs, d, bits)
    k, v = torch.randn(7, hkv, d), torch.randn(7, hkv, d)
    table = torch.tensor([[5, 2]])  # 7 tokens in blocks 5 and 2
    slots = torch.tensor([5 * bs + i for i in range(4)] + [2 * bs + i for i in range(3)])
    store_kv(k, v, cache, slots, layout)
    got = gather_kv(cache, table, 7, layout, torch.float32)[:, :, 0]  # (2, Hkv, 7, D)
    for i, x in enumerate((k, v)):
        want = dequantize(*quantize(x.transpose(0, 1), bits), bits, torch.float32)
        assert torch.equal(got[i], want)
    untouched = [b for b in range(6) if b not in (5, 2)]
    assert int(cache[:, :, untouched].count_nonzero()) == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_block_is_self_contained(bits: int) -> None:
    """Copying one block id's bytes elsewhere moves its values and their scales together."""
    bs, d = 8, 64
    cache = _quant_cache(bits, 2, 4, bs, d)
    layout = KVLayout(bs, d, bits)
    store_kv(torch.randn(8, 2, d), torch.randn(8, 2, d), cache, torch.arange(8) + bs, layout)  # block 1
    cache[:, :, 3] = cache[:, :, 1]
    a = gather_kv(cache, torch.tensor([[1]]), 8, layout, torch.float32)
    b = gather_kv(cache, torch.tensor([[3]]), 8, layout, torch.float32)
    assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bs", [1, 16])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(8, 2, 64), (4, 4, 128), (6, 1, 64)])
def test_quantized_cpu_path_matches_reference(bits: int, bs: int, hq: int, hkv: int, d: int) -> None:
    g = torch.Generator().manual_seed(0)
    seq_lens, query_lens = [1, 19, 33, 20, 40], [1, 1, 1, 20, 9]
    nblocks = sum(-(-n // bs) for n in seq_lens) + 2
    cache = _quant_cache(bits, hkv, nblocks, bs, d)
    layout = KVLayout(bs, d, bits)
    free = torch.randperm(nblocks, generator=g).tolist()
    tables = torch.zeros(len(seq_lens), max(-(-n // bs) for n in seq_lens), dtype=torch.int32)
    for i, n in enumerate(seq_lens):
        blocks = [free.pop() for _ in range(-(-n // bs))]
        tables[i, : len(blocks)] = torch.tensor(blocks)
        slots = torch.tensor([blocks[t // bs] * bs + t % bs for t in range(n)])
        store_kv(
            torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g), cache, slots, layout
        )
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], hq, d, generator=g)
    ref = paged_attention_ref(q, cache, tables, seq_lens, qsl, d**-0.5, layout)
    out = paged_attention_cpu(q, cache, tables, seq_lens, qsl, 3, d**-0.5, layout)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_decode_from_codes_is_as_accurate_as_dequantized_bf16(bits: int) -> None:
    """The CPU decode path multiplies bf16 queries by the integer codes directly. Its error against the
    float32 result must be no worse than attending in bf16 over the dequantized values: with unsigned codes
    (0..255) a bf16 matmul output is mostly a large common offset, rounded, then cancelled (2.3x worse)."""
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, d, bs, nblk = 8, 8, 2, 32, 16, 19
    length = nblk * bs
    layout = KVLayout(bs, d, bits)
    cache = _quant_cache(bits, hkv, b * nblk, bs, d)
    tables = torch.arange(b * nblk, dtype=torch.int32).view(b, nblk)  # sequence i owns a contiguous run
    k = torch.randn(b * length, hkv, d, generator=g) * 2 + 0.5  # K/V rows are not centred on 0
    v = torch.randn(b * length, hkv, d, generator=g) + 0.3
    store_kv(k, v, cache, torch.arange(b * length), layout)
    q = torch.randn(b, hq, d, generator=g)
    lens = [length] * b
    want = decode_attention_cpu(q, cache, tables, lens, d**-0.5, layout)  # float32 throughout
    got = decode_attention_cpu(q.bfloat16(), cache, tables, lens, d**-0.5, layout).float()
    dq = gather_kv(cache, tables, length, layout, torch.float32)  # (2, Hkv, B, L, D), same values
    fcache = dq.reshape(2, hkv, b * nblk, bs, d).bfloat16()
    base = decode_attention_cpu(q.bfloat16(), fcache, tables, lens, d**-0.5, KVLayout(bs, d)).float()
    err, base_err = (got - want).abs().mean(), (base - want).abs().mean()
    assert err <= 1.25 * base_err, (float(err), float(base_err))
