"""Exact-state tests for the block pool and the KV cache manager."""

from __future__ import annotations

import pytest

from qserve.cache.block_pool import BlockPool
from qserve.cache.kv_cache_manager import KVCacheManager


def test_pool_allocate_free_order_and_refcounts() -> None:
    pool = BlockPool(5)
    assert list(pool.free_blocks) == [0, 1, 2, 3, 4]
    a = pool.allocate(2)
    b = pool.allocate(2)
    assert (a, b) == ([0, 1], [2, 3])
    assert list(pool.free_blocks) == [4]
    assert pool.ref_counts == [1, 1, 1, 1, 0]
    pool.touch([1])  # a second reference (e.g. a prefix-cache hit) to an allocated block
    pool.free([1, 0])
    assert pool.ref_counts == [0, 1, 1, 1, 0]
    assert list(pool.free_blocks) == [4, 0]  # block 1 still referenced
    pool.free([1])
    assert list(pool.free_blocks) == [4, 0, 1]
    assert pool.usage() == pytest.approx(2 / 5)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([0])
    with pytest.raises(RuntimeError, match="asked for 4 blocks"):
        pool.allocate(4)


def test_manager_grows_tables_all_or_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate_slots(7, 5) == [0, 1]  # 5 tokens -> 2 blocks
    assert kv.allocate_slots(7, 8) == []  # still 2 blocks
    assert kv.allocate_slots(9, 4) == [2]
    assert kv.allocate_slots(7, 9) == [3]
    assert kv.get_block_table(7) == [0, 1, 3]
    assert kv.allocate_slots(9, 5) is None  # nothing free: unchanged
    assert kv.get_block_table(9) == [2]
    assert kv.pool.num_free_blocks == 0
    kv.free(7)
    assert list(kv.pool.free_blocks) == [3, 1, 0]  # tail first
    assert kv.get_block_table(7) == []
    assert kv.capacity_tokens == 16
    kv.free(9)
    assert kv.usage() == 0.0
    assert sorted(kv.pool.ref_counts) == [0, 0, 0, 0]
