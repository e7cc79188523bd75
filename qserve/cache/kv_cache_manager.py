"""Maps sequences to their blocks: grows block tables, shares cached prefixes, frees blocks when done."""

from __future__ import annotations

from qserve.cache.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Owns one block table (a list of block ids) per sequence id, and the prefix cache.

    ``allocate_slots(seq_id, num_tokens)`` makes the table hold ``num_tokens`` tokens in total; it is
    all-or-nothing, so a failed call leaves the pool and the table unchanged.

    Prefix caching: a full block is named by a chained hash of its tokens, the hashes of all blocks before
    it, and ``cache_salt`` (the KV dtype: int4 blocks never stand in for fp16 ones). ``match_prefix`` gives a
    new sequence the longest run of cached blocks for its tokens; ``cache_full_blocks`` publishes blocks once
    their KV has been computed. Shared blocks are full, so nobody writes into them again.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, cache_salt: str = ""
    ):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self._root = hash(("qserve-kv", cache_salt))
        self.seq_hashes: dict[int, list[int]] = {}  # hashes of each sequence's full blocks, in order
        self.num_published: dict[int, int] = {}  # leading blocks of each sequence already in the cache index
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found cached

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def usage(self) -> float:
        return self.pool.usage()

    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def _hashes(self, seq_id: int, token_ids: list[int], num_full: int) -> list[int]:
        hashes = self.seq_hashes.setdefault(seq_id, [])
        bs = self.block_size
        while len(hashes) < num_full:  # extend the chain; earlier blocks are never rehashed
            i = len(hashes)
            parent = hashes[-1] if hashes else self._root
            hashes.append(hash((parent, tuple(token_ids[i * bs : (i + 1) * bs]))))
        return hashes

    def match_prefix(self, seq_id: int, token_ids: list[int]) -> int:
        """Attach the longest cached prefix to a sequence with no blocks yet; returns its length in tokens.

        At least one token is always left uncached, so the step that follows has a position to sample from.
        """
        if not self.enable_prefix_caching:
            return 0
        assert not self.block_tables.get(seq_id), "match_prefix on a sequence that already has blocks"
        hits: list[int] = []
        for h in self._hashes(seq_id, token_ids, (len(token_ids) - 1) // self.block_size):
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        self.pool.touch(hits)
        self.block_tables[seq_id] = hits
        self.num_published[seq_id] = len(hits)
        return len(hits) * self.block_size

    def record_prefix_lookup(self, num_tokens: int, num_cached: int) -> None:
        """Count one admitted sequence's lookup in the hit rate (a failed admission that retries is not)."""
        self.prefix_queries += num_tokens
        self.prefix_hits += num_cached

    def cache_full_blocks(self, seq_id: int, token_ids: list[int], num_computed: int) -> None:
        """Publish the sequence's blocks whose ``block_size`` tokens all have KV computed."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables.get(seq_id, [])
        num_full = min(num_computed // self.block_size, len(table))
        done = self.num_published.get(seq_id, 0)
        if num_full <= done:  # the common decode step: no block completed
            return
        hashes = self._hashes(seq_id, token_ids, num_full)
        for i in range(done, num_full):
            self.pool.cache(table[i], hashes[i])
        self.num_published[seq_id] = num_full

    def num_blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, cdiv(num_tokens, self.block_size) - have)

    def allocate_slots(self, seq_id: int, num_tokens: int) -> list[int] | None:
        """Grow ``seq_id``'s table to cover ``num_tokens`` tokens. Returns the new block ids, or None."""
        need = self.num_blocks_needed(seq_id, num_tokens)
        if need > self.pool.num_free_blocks:
            return None
        new = self.pool.allocate(need)
        self.block_tables.setdefault(seq_id, []).extend(new)
        return new

    def get_block_table(self, seq_id: int) -> list[int]:
        return self.block_tables.get(seq_id, [])

    def free(self, seq_id: int) -> None:
        """Release all of a sequence's blocks, tail first (so its head blocks stay cached longest)."""
        table = self.block_tables.pop(seq_id, [])
        self.seq_hashes.pop(seq_id, None)
        self.num_published.pop(seq_id, None)
        self.pool.free(table[::-1])
