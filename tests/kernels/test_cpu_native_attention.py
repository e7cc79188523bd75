"""qserve's native decode attention (kernels/cpu_attention.cpp) against the decode graph's torch ops
(`store_kv_graph` + `decode_attention_graph`): the cache it writes byte for byte, the output to fp32 noise,
over every KV dtype, head dims that are and are not multiples of 16, GQA groups, block sizes, windows and
padding; its errors; thread independence; torch.compile with no graph break and the cache written in place."""

from __future__ import annotations

import pytest
import torch

from qserve.kernels import cpu_native
from qserve.kernels.attention import KVLayout
from qserve.kernels.attention_graph import decode_attention_graph, store_kv_graph
from qserve.kernels.kv_quant import block_bytes

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="needs AVX512-BF16 and a C++ compiler")

NUM_BLOCKS = 64


def make_cache(layout: KVLayout, hkv: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A cache whose every slot holds a random token (written by the torch path)."""
    bs, d = layout.block_size, layout.head_dim
    if layout.bits:
        cache = torch.zeros(2, hkv, NUM_BLOCKS, block_bytes(bs, d, layout.bits), dtype=torch.uint8)
    else:
        cache = torch.zeros(2, hkv, NUM_BLOCKS, bs, d, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    hist = torch.randn(2, NUM_BLOCKS * bs, hkv, d, generator=gen).to(dtype)
    store_kv_graph(hist[0], hist[1], cache, torch.arange(NUM_BLOCKS * bs), layout)
    return cache


def case(
    layout: KVLayout, hq: int, hkv: int, lens: list[int], dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    """q, k, v, slots, tables, lens of a decode batch: sequence i's new token at position lens[i] - 1 of its
    own random blocks; length 0 is a padding sequence (slot -1)."""
    gen = torch.Generator().manual_seed(seed)
    b, bs, d = len(lens), layout.block_size, layout.head_dim
    nblk = max(2, -(-max(lens) // bs))
    tables = torch.randperm(NUM_BLOCKS, generator=gen)[: b * nblk].view(b, nblk).int()
    slots = torch.tensor(
        [int(tables[i, (n - 1) // bs]) * bs + (n - 1) % bs if n else -1 for i, n in enumerate(lens)]
    )
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, d, generator=gen).to(dtype)
    return q, k, v, slots, tables, torch.tensor(lens, dtype=torch.int32)


def run_both(
    layout: KVLayout, hq: int, hkv: int, lens: list[int], dtype: torch.dtype, window: int = 0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(native out, torch out, native cache, torch cache) from one starting cache."""
    ref_cache = make_cache(layout, hkv, dtype, seed)
    cache = ref_cache.clone()
    q, k, v, slots, tables, seq_lens = case(layout, hq, hkv, lens, dtype, seed + 1)
    scale = layout.head_dim**-0.5
    store_kv_graph(k, v, ref_cache, slots, layout)
    ref = decode_attention_graph(q, ref_cache, tables, seq_lens, scale, layout, window)
    out = cpu_native.decode_attention(
        q,
        k,
        v,
        cache,
        slots,
        tables,
        seq_lens,
        scale,
        layout.block_size,
        layout.head_dim,
        layout.bits,
        window,
    )
    return out, ref, cache, ref_cache


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    # fp32: summation order and the polynomial exp; bf16 / fp16: at most one rounding of the output apart
    tol = 2e-6 if out.dtype == torch.float32 else 2**-7 if out.dtype == torch.bfloat16 else 2**-10
    err = (out.float() - ref.float()).abs()
    assert bool((err <= tol * (1 + ref.float().abs())).all()), f"max error {err.max().item()}"


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [8, 32, 40, 64, 128, 256])
def test_matches_the_graph_ops(bits: int, dtype: torch.dtype, head_dim: int) -> None:
    layout = KVLayout(16, head_dim, bits)
    out, ref, cache, ref_cache = run_both(layout, 8, 2, [37, 1, 0, 160, 16], dtype, seed=head_dim + bits)
    assert torch.equal(cache, ref_cache)  # the same bytes: codes, fp16 scales and zeros
    assert_close(out, ref)
    assert bool((out[2] == 0).all())  # the padding sequence


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize(("hq", "hkv"), [(1, 1), (4, 4), (8, 1), (12, 4), (16, 2)])
@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_gqa_groups_and_block_sizes(bits: int, hq: int, hkv: int, block_size: int) -> None:
    layout = KVLayout(block_size, 32, bits)
    lens = [min(n, NUM_BLOCKS * block_size // 5) for n in (3, 70, 1, 45, 17)]
    out, ref, cache, ref_cache = run_both(layout, hq, hkv, lens, torch.float32, seed=hq * 10 + block_size)
    assert torch.equal(cache, ref_cache)
    assert_close(out, ref)


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("window", [1, 5, 16, 40, 1000])
def test_sliding_window(bits: int, window: int) -> None:
    out, ref, _, _ = run_both(
        KVLayout(16, 64, bits), 4, 2, [100, 3, 64, 0], torch.float32, window, seed=window
    )
    assert_close(out, ref)


def test_quantized_store_rounds_like_kv_quant() -> None:
    """Values on the rounding boundaries (x - zero exactly half a step) and constant rows (scale 0)."""
    layout = KVLayout(8, 32, 8)
    ref_cache = make_cache(layout, 1, torch.float32, 3)
    cache = ref_cache.clone()
    k = (torch.arange(32, dtype=torch.float32) * 0.5).view(1, 1, 32)  # scale 15.5/255, many near-half codes
    v = torch.full((1, 1, 32), 0.25)  # hi == lo
    q = torch.randn(1, 1, 32)
    slots, tables, lens = (
        torch.tensor([11]),
        torch.tensor([[0, 1]], dtype=torch.int32),
        torch.tensor([12]).int(),
    )
    store_kv_graph(k, v, ref_cache, slots, layout)
    cpu_native.decode_attention(q, k, v, cache, slots, tables, lens, 0.2, 8, 32, 8, 0)
    assert torch.equal(cache, ref_cache)


def test_threads_do_not_change_the_result() -> None:
    layout = KVLayout(16, 64, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_both(layout, 8, 2, [50, 120, 7, 33], torch.bfloat16)[0]
        torch.set_num_threads(max(2, threads))
        many = run_both(layout, 8, 2, [50, 120, 7, 33], torch.bfloat16)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_errors() -> None:
    layout = KVLayout(16, 32, 8)
    cache = make_cache(layout, 2, torch.float32, 0)
    q, k, v, slots, tables, lens = case(layout, 8, 2, [20, 5], torch.float32, 1)

    def call(bits: int = 8, **kw: torch.Tensor) -> None:
        args = dict(q=q, k=k, v=v, kv_cache=cache, slot_mapping=slots, block_tables=tables, seq_lens=lens)
        args.update(kw)
        cpu_native.decode_attention(**args, scale=0.1, block_size=16, head_dim=32, bits=bits)

    with pytest.raises(RuntimeError, match="bits must be 0, 8 or 4"):
        call(bits=3)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        call(k=k.bfloat16())
    with pytest.raises(RuntimeError, match="heads do not match"):
        call(q=q[:, :7])
    with pytest.raises(RuntimeError, match="past the cache"):
        call(slot_mapping=torch.tensor([NUM_BLOCKS * 16, 3]))
    with pytest.raises(RuntimeError, match="does not fit its block table"):
        call(seq_lens=torch.tensor([20, 33], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="block id"):
        call(block_tables=torch.tensor([[0, NUM_BLOCKS], [1, 2]], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="int32"):
        call(seq_lens=lens.long())
    with pytest.raises(RuntimeError, match="quantized cache is uint8"):
        call(kv_cache=cache[..., :-1].contiguous())
    with pytest.raises(RuntimeError, match="one table row per sequence"):
        call(slot_mapping=slots[:1])


def test_compiles_without_graph_break_writes_the_cache_in_place_and_opcheck() -> None:
    layout = KVLayout(16, 32, 4)
    cache = make_cache(layout, 2, torch.bfloat16, 5)
    ref_cache = cache.clone()
    q, k, v, slots, tables, lens = case(layout, 8, 2, [30, 9], torch.bfloat16, 6)

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        out = cpu_native.decode_attention(q * 1, k, v, cache, slots, tables, lens, 0.17, 16, 32, 4, 0)
        return out.float().sum(-1)

    assert torch._dynamo.explain(f)(q, k, v, cache.clone()).graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(q, k, v, cache)
    store_kv_graph(k, v, ref_cache, slots, layout)
    want = decode_attention_graph(q, ref_cache, tables, lens, 0.17, layout).float().sum(-1)
    assert torch.equal(cache, ref_cache)  # the caller's cache tensor holds the new tokens
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.library.opcheck(
        torch.ops.qserve_cpu.decode_attention.default,
        (q, k, v, cache.clone(), slots, tables, lens, 0.17, 16, 32, 4, 0),
        test_utils=("test_schema", "test_faketensor"),
    )
