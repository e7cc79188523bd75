"""A pool of fixed-size KV blocks: a free list, reference counts, and the prefix cache's hash index."""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    """Hands out block ids from the head of a FIFO free list; a block returns to the tail at ref count 0.

    Invariant: every block id is either in the free list with ref count 0, or out with ref count >= 1.
    A free block may still be *cached*: it keeps its contents and its hash until it is handed out again
    (evicted), so the free list doubles as the LRU order for eviction: least recently freed goes first.
    """

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id holding that content

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def usage(self) -> float:
        """Fraction of blocks in use (referenced), in [0, 1]."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the head of the free list, evicting their cached content."""
        if n > len(self.free_blocks):
            raise RuntimeError(f"asked for {n} blocks, {len(self.free_blocks)} free")
        out = []
        for _ in range(n):
            b, _ = self.free_blocks.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                del self.cached[h]
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            out.append(b)
        return out

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference to cached blocks (a prefix-cache hit), reviving free ones."""
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self.free_blocks[b]
            self.ref_counts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block, in the order given; blocks reaching 0 join the free list."""
        for b in block_ids:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"double free of block {b}")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_blocks[b] = None

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    def cache(self, block_id: int, block_hash: int) -> None:
        """Record that ``block_id`` holds the content ``block_hash`` (first writer wins)."""
        if block_hash not in self.cached and self.block_hash[block_id] is None:
            self.cached[block_hash] = block_id
            self.block_hash[block_id] = block_hash
