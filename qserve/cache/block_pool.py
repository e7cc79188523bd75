"""A pool of fixed-size KV blocks: a free list and reference counts."""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Hands out block ids from a FIFO free list; a block returns to the tail when its ref count hits 0.

    Invariant: every block id is either in the free list with ref count 0, or out with ref count >= 1.
    Freed blocks go to the tail, so the most recently used blocks are the last to be reused (which is
    what prefix caching wants: recently freed blocks keep their contents longest).
    """

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the head of the free list. Raises if fewer are free (check first)."""
        if n > len(self.free_blocks):
            raise RuntimeError(f"asked for {n} blocks, {len(self.free_blocks)} free")
        out = [self.free_blocks.popleft() for _ in range(n)]
        for b in out:
            self.ref_counts[b] = 1
        return out

    def incref(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"incref on free block {b}")
            self.ref_counts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block, in the order given; blocks reaching 0 join the free list."""
        for b in block_ids:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"double free of block {b}")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free_blocks.append(b)
