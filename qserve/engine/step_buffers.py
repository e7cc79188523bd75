"""The step's persistent input buffers and the padded token-count buckets the compiled forward runs at.

Every step writes its inputs in place into buffers allocated once at their maximum size, so a compiled
graph (and, on CUDA, a captured graph) always reads the same storage. A compiled step pads its token count
up to a bucket (vLLM's capture sizes: 1, 2, 4, then every 8 up to 256, then every 16), so a handful of graph
shapes serves every batch. Padding is inert: padding token rows have slot -1 (no KV write) and are never
sampled; padding sequences have length 0 and an empty query range (kernels.cpu_ops).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from qserve.kernels.attention import KVLayout
from qserve.layers.attention import AttentionMetadata


def buffer_shapes(
    max_tokens: int, max_seqs: int, max_blocks: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every device buffer :class:`StepBuffers` allocates (the planner counts
    these same shapes, so its byte count is the allocation's).

    The buffers the forward reads have one spare row past the largest step: a step's view is then never
    its whole buffer. Dynamo guards on a view being its whole base (``x._base.size(0) == x.size(0)``), so
    a warm-up at the largest shape would leave every smaller step (a 128-token prefill) to compile again
    while serving, and a warm-up below it every full-size step."""
    t, s = max_tokens + 1, max_seqs + 1
    return {
        "input_ids": ((t,), torch.int64),
        "positions": ((t,), torch.int64),
        "slot_mapping": ((t,), torch.int64),
        "seq_lens": ((s,), torch.int32),
        "query_start_loc": ((s + 1,), torch.int32),
        "block_tables": ((s, max_blocks), torch.int32),
        # per decode row: the row of the last step's sampled tokens its input token is, or -1 (from the host)
        "token_src": ((max_seqs,), torch.int64),
        "logits_rows": ((max_seqs,), torch.int64),  # the hidden row each sampled sequence's logits come from
    }


def step_buffer_bytes(max_tokens: int, max_seqs: int, max_blocks: int) -> int:
    """Device bytes of the step buffers (on CUDA the pinned host staging doubles them in host memory)."""
    shapes = buffer_shapes(max_tokens, max_seqs, max_blocks)
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values())


def token_buckets(max_tokens: int) -> tuple[int, ...]:
    """Padded token counts, ascending, the last one ``max_tokens`` (vLLM's capture-size progression)."""
    sizes = [1, 2, 4, *range(8, 256, 8), *range(256, max_tokens + 1, 16)]
    return (*(s for s in sizes if s < max_tokens), max_tokens)


@dataclass(frozen=True)
class StepShape:
    """The (possibly padded) sizes one step runs at: token rows and sequence rows."""

    tokens: int
    seqs: int


@dataclass(frozen=True)
class StepView:
    """Views of the buffers at one step's shape: what the model reads."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64, -1 on padding rows
    seq_lens: torch.Tensor  # (S,) int32, 0 on padding sequences
    query_start_loc: torch.Tensor  # (S + 1,) int32
    block_tables: torch.Tensor  # (S, max_blocks) int32

    def metadata(self, layout: KVLayout) -> AttentionMetadata:
        return AttentionMetadata(
            self.slot_mapping, self.block_tables, self.seq_lens, self.query_start_loc, layout
        )


_FILLED = ("input_ids", "positions", "slot_mapping", "seq_lens", "query_start_loc", "block_tables")


class StepBuffers:
    """Host staging (numpy views, pinned on CUDA) and device buffers, allocated once.

    Args:
        max_tokens: most token rows in a step (the scheduler's token budget).
        max_seqs: most sequences in a step.
        max_blocks: most KV blocks of one sequence (max_model_len / block_size, rounded up).
        device: where the model reads them; on CPU host and device buffers are the same storage.
    """

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device):
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        self.buckets = token_buckets(max_tokens)
        pin = device.type == "cuda"
        shapes = buffer_shapes(max_tokens, max_seqs, max_blocks)
        self.host = {k: torch.zeros(s, dtype=d, pin_memory=pin) for k, (s, d) in shapes.items()}
        self.np = {k: t.numpy() for k, t in self.host.items()}
        self.device_bufs = (
            self.host if not pin else {k: torch.zeros_like(t, device=device) for k, t in self.host.items()}
        )
        self.nbytes = sum(t.numel() * t.element_size() for t in self.device_bufs.values())
        # CUDA: per staging buffer, the event after its last async copy. A copy reads the pinned memory when
        # it runs, so the next write waits for it (with the async look-ahead a step is filled while the one
        # before may still wait for its copies; those run as soon as the step before that is done)
        self._copied: dict[str, torch.cuda.Event] = {}

    def _staging(self, keys: tuple[str, ...]) -> None:
        """Wait until the pending copies out of these staging buffers have run (CUDA; free on CPU)."""
        for k in keys:
            ev = self._copied.pop(k, None)
            if ev is not None:
                ev.synchronize()

    def _copied_now(self, keys: tuple[str, ...]) -> None:
        ev = torch.cuda.Event()
        ev.record()
        for k in keys:
            self._copied[k] = ev

    def padded_shape(self, tokens: int, seqs: int) -> StepShape | None:
        """The bucket a step of ``tokens`` rows runs at, or None when it is larger than every bucket."""
        i = bisect.bisect_left(self.buckets, tokens)
        if i == len(self.buckets):
            return None
        t = self.buckets[i]
        return StepShape(t, max(seqs, min(t, self.max_seqs)))

    def fill(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        query_start_loc: list[int],
        tables: list[list[int]],
        shape: StepShape,
    ) -> StepView:
        """Write one step's inputs (exact sizes) in place and pad them up to ``shape``."""
        n, b = len(input_ids), len(seq_lens)
        t, s = shape.tokens, shape.seqs
        assert n <= t <= self.max_tokens and b <= s <= self.max_seqs, (n, t, b, s)
        a = self.np
        self._staging(_FILLED)
        a["input_ids"][:n] = input_ids
        a["positions"][:n] = positions
        a["slot_mapping"][:n] = slots
        a["input_ids"][n:t] = 0
        a["positions"][n:t] = 0
        a["slot_mapping"][n:t] = -1  # padding rows write no KV
        a["seq_lens"][:b] = seq_lens
        a["seq_lens"][b:s] = 0
        a["query_start_loc"][: b + 1] = query_start_loc
        a["query_start_loc"][b + 1 : s + 1] = n
        bt = a["block_tables"]
        for i, row in enumerate(tables):
            bt[i, : len(row)] = row
        if s > b:
            bt[b:s] = 0
        if self.device_bufs is not self.host:  # CUDA: one async copy per buffer from pinned memory
            for k, dev in self.device_bufs.items():
                if k in ("token_src", "logits_rows"):
                    continue  # written by `token_sources` / `rows_index`
                rows = t if k in ("input_ids", "positions", "slot_mapping") else s + (k == "query_start_loc")
                dev[:rows].copy_(self.host[k][:rows], non_blocking=True)
            self._copied_now(_FILLED)
        return self.view(shape)

    def token_sources(self, rows: list[int]) -> torch.Tensor:
        """Write, for the step's first ``len(rows)`` token rows, the row of the last step's sampled tokens
        each takes its input token from (-1: the host wrote it); returns the device view (R,) int64."""
        n = len(rows)
        assert n <= self.max_seqs, (n, self.max_seqs)
        self._staging(("token_src",))
        self.np["token_src"][:n] = rows
        dev = self.device_bufs["token_src"][:n]
        if self.device_bufs is not self.host:
            dev.copy_(self.host["token_src"][:n], non_blocking=True)
            self._copied_now(("token_src",))
        return dev

    def rows_index(self, rows: list[int]) -> torch.Tensor:
        """The hidden rows whose logits are sampled, as a device index (R,) int64 (a pinned async copy on
        CUDA: indexing with a list would copy it synchronously, a host sync per step)."""
        n = len(rows)
        assert n <= self.max_seqs, (n, self.max_seqs)
        self._staging(("logits_rows",))
        self.np["logits_rows"][:n] = rows
        dev = self.device_bufs["logits_rows"][:n]
        if self.device_bufs is not self.host:
            dev.copy_(self.host["logits_rows"][:n], non_blocking=True)
            self._copied_now(("logits_rows",))
        return dev

    def fill_padding(self, shape: StepShape) -> StepView:
        """An all-padding step (warm-up, capture): no KV write, nothing attended, the cache untouched."""
        return self.fill([], [], [], [], [0], [], shape)

    def view(self, shape: StepShape) -> StepView:
        """The device buffers at ``shape`` (what a captured graph reads, whatever step filled them)."""
        t, s, d = shape.tokens, shape.seqs, self.device_bufs
        return StepView(
            d["input_ids"][:t],
            d["positions"][:t],
            d["slot_mapping"][:t],
            d["seq_lens"][:s],
            d["query_start_loc"][: s + 1],
            d["block_tables"][:s],
        )
