"""The CPU custom ops: padded batches through torch.ops.qserve.paged_attention_cpu, every KV dtype, against
the reference on the unpadded batch; opcheck; the prepacked bf16 linear against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qserve.kernels import cpu_native
from qserve.kernels.attention import KVLayout, paged_attention_ref, store_kv
from qserve.kernels.cpu_ops import batch_layout, linear_packed, paged_attention_cpu_op
from qserve.kernels.kv_quant import block_bytes

HQ, HKV, D, BS = 4, 2, 32, 4


def make_cache(bits: int, num_blocks: int) -> torch.Tensor:
    if bits:
        return torch.zeros(2, HKV, num_blocks, block_bytes(BS, D, bits), dtype=torch.uint8)
    return torch.zeros(2, HKV, num_blocks, BS, D)


def padded_batch(
    seq_lens: list[int], query_lens: list[int], pad_tokens: int, pad_seqs: int, bits: int
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, list[int]]:
    """Op inputs of a batch whose new tokens fill their sequences' last positions, padded by ``pad_tokens``
    rows and ``pad_seqs`` sequences; earlier context is stored first. Returns (args, cache, qsl)."""
    g = torch.Generator().manual_seed(len(seq_lens) * 7 + bits)
    nblk = max(-(-n // BS) for n in seq_lens)
    cache = make_cache(bits, len(seq_lens) * nblk + 2)
    tables = torch.arange(len(seq_lens) * nblk, dtype=torch.int32).flip(0).view(len(seq_lens), nblk)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    t = qsl[-1]
    q, k, v = (torch.randn(t, h, D, generator=g) for h in (HQ, HKV, HKV))
    slots = []
    for i, (n, ql) in enumerate(zip(seq_lens, query_lens, strict=True)):
        # the earlier context goes in first, quantized like the op's own writes
        ctx = torch.randn(n - ql, 2, HKV, D, generator=g)
        ctx_slots = [int(tables[i, p // BS]) * BS + p % BS for p in range(n - ql)]
        if ctx_slots:
            store_kv(ctx[:, 0], ctx[:, 1], cache, torch.tensor(ctx_slots), KVLayout(BS, D, bits))
        slots += [int(tables[i, p // BS]) * BS + p % BS for p in range(n - ql, n)]
    s = len(seq_lens)
    pad = lambda x: torch.cat([x, torch.full((pad_tokens, *x.shape[1:]), 9.0)])  # noqa: E731
    args = (
        pad(q),
        pad(k),
        pad(v),
        cache,
        torch.tensor(slots + [-1] * pad_tokens),
        torch.cat([tables, torch.zeros(pad_seqs, nblk, dtype=torch.int32)]),
        torch.tensor(seq_lens + [0] * pad_seqs, dtype=torch.int32),
        torch.tensor(qsl + [t] * pad_seqs, dtype=torch.int32),
    )
    assert len(args[6]) == s + pad_seqs
    return args, cache, qsl


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize(("pad_tokens", "pad_seqs"), [(0, 0), (3, 0), (5, 2)])
@pytest.mark.parametrize("native", [True, False], ids=["native-decodes", "torch-decodes"])
@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "decodes-only"])
def test_padded_batch_matches_reference(
    bits: int, pad_tokens: int, pad_seqs: int, native: bool, mixed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decodes through the native kernel where it runs (kernels/cpu_attention.cpp), or the torch plan."""
    if native and not cpu_native.available():
        pytest.skip("needs the native kernels")
    monkeypatch.setenv("QSERVE_NATIVE_ATTENTION", "1" if native else "0")
    seq_lens, query_lens = [5, 9, 1, 12, 7], [1, 1, 1, 12, 3]  # three decodes, a prefill, a chunk
    if not mixed:
        query_lens = [1] * len(seq_lens)
    args, cache, qsl = padded_batch(seq_lens, query_lens, pad_tokens, pad_seqs, bits)
    layout = KVLayout(BS, D, bits)
    untouched = cache.clone()
    out = paged_attention_cpu_op(*args, D**-0.5, BS, D, bits, 0)
    t = qsl[-1]
    assert out.shape == args[0].shape
    assert torch.equal(out[t:], torch.zeros_like(out[t:]))  # padding rows attend nothing
    ref = paged_attention_ref(args[0][:t], cache, args[5], seq_lens, qsl, D**-0.5, layout)
    torch.testing.assert_close(out[:t], ref, atol=2e-2 if bits == 4 else 5e-3, rtol=0)
    if not bits:  # exactly the real slots were written: padding rows (slot -1) wrote nothing
        changed = (cache != untouched).any(-1).any(0).any(0).flatten()  # (NB * BS,): per slot
        assert changed.nonzero().flatten().tolist() == sorted(int(s) for s in args[4][:t])


def test_batch_layout() -> None:
    assert batch_layout([5, 9, 12, 0, 0], [0, 1, 2, 14, 14, 14]) == (3, 2)
    assert batch_layout([0, 0], [0, 0, 0]) == (0, 0)
    assert batch_layout([3], [0, 3]) == (1, 0)
    assert batch_layout([3, 4], [0, 1, 2]) == (2, 2)


def test_all_padding_writes_nothing() -> None:
    cache = make_cache(0, 4)
    q = torch.randn(4, HQ, D)
    kv = torch.randn(4, HKV, D)
    out = paged_attention_cpu_op(
        q, kv, kv, cache, torch.full((4,), -1), torch.zeros(3, 2, dtype=torch.int32),
        torch.zeros(3, dtype=torch.int32), torch.zeros(4, dtype=torch.int32), 0.1, BS, D, 0, 0,
    )  # fmt: skip
    assert torch.equal(out, torch.zeros_like(q)) and torch.equal(cache, torch.zeros_like(cache))


def test_opcheck_attention() -> None:
    args, _, _ = padded_batch([5, 6], [1, 6], 2, 1, 0)
    torch.library.opcheck(
        torch.ops.qserve.paged_attention_cpu.default,
        (*args, D**-0.5, BS, D, 0, 0),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize(("m", "k", "n"), [(1, 64, 32), (7, 128, 96), (33, 256, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_packed_matches_f_linear(m: int, k: int, n: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
    with torch.inference_mode():
        assert torch.equal(linear_packed(x, packed, b, n), F.linear(x, w, b))
