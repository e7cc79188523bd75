"""Maps sequences to their blocks: grows block tables as tokens arrive, frees them when done."""

from __future__ import annotations

from qserve.cache.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Owns one block table (a list of block ids) per sequence id.

    ``allocate_slots(seq_id, num_tokens)`` makes the table hold ``num_tokens`` tokens in total; it is
    all-or-nothing, so a failed call leaves the pool and the table unchanged.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[int, list[int]] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    def usage(self) -> float:
        return self.pool.usage()

    def num_blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        have = len(self.block_tables.get(seq_id, ()))
        return max(0, cdiv(num_tokens, self.block_size) - have)

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        return self.num_blocks_needed(seq_id, num_tokens) <= self.pool.num_free_blocks

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
        self.pool.free(table[::-1])
