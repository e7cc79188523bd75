"""The CPU paged-attention path against the pure-torch reference, and the reference against plain SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qserve.kernels.attention import KVLayout, gather_kv, paged_attention_cpu, paged_attention_ref, store_kv


def build(
    seq_lens: list[int], query_lens: list[int], hq: int, hkv: int, d: int, bs: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """A cache holding each sequence's keys/values in shuffled blocks, and packed queries."""
    g = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-n // bs) for n in seq_lens) + 3
    cache = torch.randn(2, hkv, nblocks, bs, d, generator=g)
    perm = torch.randperm(nblocks, generator=g).tolist()
    width = max(-(-n // bs) for n in seq_lens)
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for i, n in enumerate(seq_lens):
        for j in range(-(-n // bs)):
            tables[i, j] = perm.pop()
    qsl = [0]
    for q in query_lens:
        qsl.append(qsl[-1] + q)
    q = torch.randn(qsl[-1], hq, d, generator=g)
    return q, cache, tables, qsl


@pytest.mark.parametrize("bs", [1, 4, 16])
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("d", [16, 64])
def test_cpu_path_matches_reference(bs: int, hq: int, hkv: int, d: int) -> None:
    # three decodes first, then a full prefill, a chunk continuing a context, and a 1-token sequence
    seq_lens = [1, 17, 33, 20, 40, 5]
    query_lens = [1, 1, 1, 20, 9, 5]
    q, cache, tables, qsl = build(seq_lens, query_lens, hq, hkv, d, bs)
    # a full prefill reads its fresh K/V, which must equal what is in its blocks
    k_new = torch.zeros(qsl[-1], hkv, d)
    v_new = torch.zeros(qsl[-1], hkv, d)
    for i in (3, 5):
        kv = gather_kv(cache, tables[i : i + 1], seq_lens[i])[:, :, 0].transpose(1, 2)  # (2, L, Hkv, D)
        k_new[qsl[i] : qsl[i + 1]], v_new[qsl[i] : qsl[i + 1]] = kv[0], kv[1]
    scale = d**-0.5
    ref = paged_attention_ref(q, cache, tables, seq_lens, qsl, scale, KVLayout(bs, d))
    out = paged_attention_cpu(
        q, cache, tables, seq_lens, qsl, 3, scale, KVLayout(bs, d), new_kv=(k_new, v_new)
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 4, 9])
def test_sliding_window(window: int) -> None:
    seq_lens, query_lens = [12, 30, 30], [1, 30, 7]
    q, cache, tables, qsl = build(seq_lens, query_lens, 4, 2, 16, 4)
    ref = paged_attention_ref(q, cache, tables, seq_lens, qsl, 0.25, KVLayout(4, 16), sliding_window=window)
    out = paged_attention_cpu(
        q, cache, tables, seq_lens, qsl, 1, 0.25, KVLayout(4, 16), sliding_window=window
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_reference_equals_dense_causal_attention() -> None:
    seq_len, hq, hkv, d, bs = 23, 4, 2, 8, 4
    q, cache, tables, qsl = build([seq_len], [seq_len], hq, hkv, d, bs)
    k, v = gather_kv(cache, tables[:1], seq_len)[:, :, 0]  # (Hkv, L, D) each
    dense = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(2, 0),
        v.repeat_interleave(2, 0),
        is_causal=True,
    ).transpose(0, 1)
    ref = paged_attention_ref(q, cache, tables, [seq_len], qsl, d**-0.5, KVLayout(bs, d))
    torch.testing.assert_close(ref, dense, atol=1e-5, rtol=1e-5)


def test_store_kv_writes_exact_slots() -> None:
    cache = torch.zeros(2, 1, 4, 2, 3)  # 1 head, 4 blocks of 2 slots
    k = torch.arange(1.0, 10.0).view(3, 1, 3)
    v = -k
    store_kv(k, v, cache, torch.tensor([5, 0, 7]))
    flat = cache.view(2, 8, 1, 3)  # one head: (2, slots, 1, D)
    assert flat[0, 5].tolist() == [[1.0, 2.0, 3.0]]
    assert flat[0, 0].tolist() == [[4.0, 5.0, 6.0]]
    assert flat[1, 7].tolist() == [[-7.0, -8.0, -9.0]]
    written = (flat != 0).any(-1).any(-1)  # (2, 8) slots touched
    assert written.nonzero().tolist() == [[0, 0], [0, 5], [0, 7], [1, 0], [1, 5], [1, 7]]
