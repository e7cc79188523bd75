"""Exact-state tests for prefix caching: hits, sharing, ref counts, LRU eviction, salts."""

from __future__ import annotations

from qserve.cache.kv_cache_manager import KVCacheManager

BS = 4


def publish(kv: KVCacheManager, seq_id: int, tokens: list[int]) -> list[int]:
    """Admit a sequence, allocate all its tokens and mark them computed."""
    cached = kv.match_prefix(seq_id, tokens)
    assert kv.allocate_slots(seq_id, len(tokens)) is not None
    kv.record_prefix_lookup(len(tokens), cached)  # as the scheduler does once a sequence is admitted
    kv.cache_full_blocks(seq_id, tokens, len(tokens))
    return [cached, *kv.get_block_table(seq_id)]


def test_hit_shares_blocks_and_counts_refs() -> None:
    kv = KVCacheManager(8, BS)
    a = list(range(10))  # blocks: [0..3] [4..7] [8, 9]
    assert publish(kv, 1, a) == [0, 0, 1, 2]
    b = list(range(8)) + [99, 98, 97]  # same first two blocks
    assert kv.match_prefix(2, b) == 8
    kv.record_prefix_lookup(len(b), 8)
    assert kv.get_block_table(2) == [0, 1]
    assert kv.pool.ref_counts[:3] == [2, 2, 1]
    assert kv.allocate_slots(2, len(b)) == [3]
    assert kv.prefix_hits == 8 and kv.prefix_queries == 21
    kv.free(1)
    assert kv.pool.ref_counts[:4] == [1, 1, 0, 1]
    assert list(kv.pool.free_blocks) == [4, 5, 6, 7, 2]


def test_fully_cached_prompt_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(8, BS)
    a = list(range(8))
    publish(kv, 1, a)
    assert kv.match_prefix(2, a) == 4  # the second block holds the last token: recomputed
    assert kv.match_prefix(3, a + [8]) == 8


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    kv = KVCacheManager(4, BS)
    publish(kv, 1, list(range(8)))  # blocks 0, 1 (hashes A, B)
    kv.free(1)  # tail first: free list [2, 3, 1, 0]
    assert list(kv.pool.free_blocks) == [2, 3, 1, 0]
    assert len(kv.pool.cached) == 2
    # a hit revives free cached blocks out of the middle of the free list
    assert kv.match_prefix(2, list(range(8)) + [50]) == 8
    assert list(kv.pool.free_blocks) == [2, 3]
    kv.free(2)
    # a new unrelated sequence needing 3 blocks takes 2, 3 (uncached) then 1 (evicting block B's content)
    assert kv.match_prefix(3, [70] * 12) == 0
    assert kv.allocate_slots(3, 12) == [2, 3, 1]
    assert kv.pool.block_hash[1] is None and len(kv.pool.cached) == 1
    assert kv.match_prefix(4, list(range(8)) + [50]) == 4  # only block A (block 0) is left


def test_salt_and_disable() -> None:
    int4 = KVCacheManager(8, BS, cache_salt="int4")
    fp16 = KVCacheManager(8, BS, cache_salt="fp16")
    tokens = list(range(9))
    assert int4._hashes(1, tokens, 2) != fp16._hashes(1, tokens, 2)
    off = KVCacheManager(8, BS, enable_prefix_caching=False)
    publish(off, 1, tokens)
    assert off.match_prefix(2, tokens) == 0 and off.pool.cached == {}


def test_partial_blocks_are_never_published() -> None:
    kv = KVCacheManager(8, BS)
    tokens = list(range(7))
    kv.match_prefix(1, tokens)
    kv.allocate_slots(1, 7)
    kv.cache_full_blocks(1, tokens, 5)  # 5 computed: only block 0 is full
    assert list(kv.pool.cached.values()) == [0]
    kv.cache_full_blocks(1, tokens, 7)
    assert list(kv.pool.cached.values()) == [0]
