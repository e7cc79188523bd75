"""The decode attention the compiled decode graph runs (kernels.attention_graph), eager and under
torch.compile, against the reference: every KV dtype, GQA groups, sliding windows, padded rows and
sequences, tables wider than needed; the stores write exactly the real slots, in place when compiled."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from qserve.kernels.attention import KVLayout, paged_attention_ref, store_kv
from qserve.kernels.attention_graph import decode_attention_graph, decode_table_width, store_kv_graph
from qserve.kernels.kv_quant import _split, block_bytes, quantize

D, BS = 32, 4


def make_cache(bits: int, hkv: int, num_blocks: int, dtype: torch.dtype) -> torch.Tensor:
    if bits:
        return torch.zeros(2, hkv, num_blocks, block_bytes(BS, D, bits), dtype=torch.uint8)
    return torch.zeros(2, hkv, num_blocks, BS, D, dtype=dtype)


def decode_batch(
    seq_lens: list[int], hq: int, hkv: int, bits: int, dtype: torch.dtype, pad_seqs: int, width: int
) -> tuple[torch.Tensor, ...]:
    """A decode step after its context is stored: (q, k, v, cache, slots, tables, lens), with ``pad_seqs``
    padding rows (slot -1, length 0) and tables cut to ``width`` blocks (stale block ids past a length)."""
    g = torch.Generator().manual_seed(sum(seq_lens) + hq + bits)
    nblk = max(width, max(-(-n // BS) for n in seq_lens))
    b = len(seq_lens)
    cache = make_cache(bits, hkv, b * nblk + 3, dtype)
    # scattered, reversed block ids; entries past a sequence's blocks point at other sequences' blocks
    tables = torch.randperm(b * nblk + 3, generator=g)[: b * nblk].view(b, nblk).int()
    layout = KVLayout(BS, D, bits)
    slots = []
    for i, n in enumerate(seq_lens):
        ctx = torch.randn(n - 1, 2, hkv, D, generator=g).to(dtype)
        pos = range(n - 1)
        if n > 1:
            store_kv(ctx[:, 0], ctx[:, 1], cache, torch.tensor([int(tables[i, p // BS]) * BS + p % BS for p in pos]),
                     layout)  # fmt: skip
        slots.append(int(tables[i, (n - 1) // BS]) * BS + (n - 1) % BS)
    t = b + pad_seqs
    q, k, v = (torch.randn(t, h, D, generator=g).to(dtype) for h in (hq, hkv, hkv))
    slot_t = torch.tensor(slots + [-1] * pad_seqs)
    tables = torch.cat([tables, torch.zeros(pad_seqs, nblk, dtype=torch.int32)])[:, :width]
    lens = torch.tensor(seq_lens + [0] * pad_seqs, dtype=torch.int32)
    return q, k, v, cache, slot_t, tables, lens


def attend(q, k, v, cache, slots, tables, lens, layout, window):  # type: ignore[no-untyped-def]
    store_kv_graph(k, v, cache, slots, layout)
    return decode_attention_graph(q, cache, tables, lens, D**-0.5, layout, window)


COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def compiled_attend() -> Callable[..., torch.Tensor]:
    # one compiled function for the module: dynamo adds a graph per KV dtype, head layout and window
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if "f" not in COMPILED:
        COMPILED["f"] = torch.compile(
            attend, dynamic=True, fullgraph=True, options={"emulate_precision_casts": True}
        )
    return COMPILED["f"]


CASES = [
    # seq_lens, hq, hkv, pad_seqs, extra table width, window
    ([5], 4, 2, 0, 0, 0),
    ([1], 2, 2, 0, 1, 0),
    ([9, 3, 17, 4], 4, 1, 0, 0, 0),
    ([9, 3, 17, 4], 8, 2, 3, 2, 0),
    ([12, 2, 7], 4, 4, 1, 0, 5),
    ([16, 8], 4, 2, 2, 1, 4),
]


KVS = ["fp32", "bf16", "int8", "int4"]
# every case eager; compiled (a few seconds per new graph on CI) a padded GQA batch in every KV dtype and a
# sliding window in two
RUNS = [(False, kv, *c) for kv in KVS for c in CASES]
RUNS += [(True, kv, *CASES[3]) for kv in KVS] + [(True, kv, *CASES[4]) for kv in ("fp32", "int8")]


@pytest.mark.parametrize(("compiled", "kv", "seq_lens", "hq", "hkv", "pad", "extra", "window"), RUNS)
def test_matches_reference(
    compiled: bool, kv: str, seq_lens: list[int], hq: int, hkv: int, pad: int, extra: int, window: int
) -> None:
    bits = {"int8": 8, "int4": 4}.get(kv, 0)
    dtype = torch.bfloat16 if kv == "bf16" else torch.float32
    width = -(-max(seq_lens) // BS) + extra
    q, k, v, cache, slots, tables, lens = decode_batch(seq_lens, hq, hkv, bits, dtype, pad, width)
    layout = KVLayout(BS, D, bits)
    before = cache.clone()
    fn = compiled_attend() if compiled else attend
    with torch.inference_mode():
        out = fn(q, k, v, cache, slots, tables, lens, layout, window)
    b = len(seq_lens)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.equal(out[b:], torch.zeros_like(out[b:]))  # padding sequences attend nothing
    # the same writes as the eager store of the real rows alone: padding rows wrote nothing new
    want = before.clone()
    store_kv(k[:b], v[:b], want, slots[:b], layout)
    assert torch.equal(cache, want)
    ref = paged_attention_ref(q[:b], cache, tables[:b], seq_lens, list(range(b + 1)), D**-0.5, layout,
                              window or None)  # fmt: skip
    tol = {"fp32": 1e-5, "bf16": 2e-2, "int8": 1e-5, "int4": 1e-5}[kv]
    torch.testing.assert_close(out[:b].float(), ref.float(), atol=tol, rtol=0)


def test_compiled_store_updates_the_cache_in_place() -> None:
    """The compiled store scatters into the cache tensor itself (no copy of the cache comes back)."""
    q, k, v, cache, slots, tables, lens = decode_batch([6, 3], 4, 2, 8, torch.float32, 1, 2)
    layout = KVLayout(BS, D, 8)
    ptr = cache.data_ptr()
    with torch.inference_mode():
        compiled_attend()(q, k, v, cache, slots, tables, lens, layout, 0)
    assert cache.data_ptr() == ptr
    for i, s in enumerate(slots[:2].tolist()):  # each real token's bytes are where _split says
        values, scales, zeros = _split(cache, BS, D, 8)
        qv, sc, z = quantize(k[i], 8)
        assert torch.equal(values[0, :, s // BS, s % BS], qv)
        assert torch.equal(scales[0, :, s // BS, s % BS], sc) and torch.equal(zeros[0, :, s // BS, s % BS], z)


@pytest.mark.parametrize("bits", [8, 4])
def test_store_kv_quant_bytes(bits: int) -> None:
    """The one-scatter quantized store against a token-by-token write through the layout's views."""
    g = torch.Generator().manual_seed(bits)
    k, v = torch.randn(7, 2, D, generator=g), torch.randn(7, 2, D, generator=g)
    slots = torch.tensor([0, 5, 6, 13, 2, 31, 17])
    cache = make_cache(bits, 2, 8, torch.float32)
    store_kv(k, v, cache, slots, KVLayout(BS, D, bits))
    want = make_cache(bits, 2, 8, torch.float32)
    values, scales, zeros = _split(want, BS, D, bits)
    for i, s in enumerate(slots.tolist()):
        for j, x in enumerate((k, v)):
            qv, sc, z = quantize(x[i], bits)  # (Hkv, Dq), (Hkv,), (Hkv,)
            values[j, :, s // BS, s % BS], scales[j, :, s // BS, s % BS], zeros[j, :, s // BS, s % BS] = (
                qv,
                sc,
                z,
            )
    assert torch.equal(cache, want)


def test_decode_table_width() -> None:
    assert decode_table_width(1, 16, 64) == 2  # never 1: torch would specialize it
    assert decode_table_width(33, 16, 64) == 3
    assert decode_table_width(1024, 16, 64) == 64
    assert decode_table_width(5, 16, 1) == 1  # a table of one block stays one block
