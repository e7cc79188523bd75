"""Sampled tokens that stay on the device (vLLM's async scheduling, SGLang's overlap).

A decode step's input token is the token the step before sampled. Instead of a round trip through the
host (device -> list -> step buffer -> device), the runner scatters it on the device from the last step's
sampled-token tensor into the step's ``input_ids`` buffer (:func:`scatter_tokens`); the host writes a
placeholder there. The host copy of the sampled ids, which the engine needs for stop checks and
detokenization, goes on a side stream into pinned memory with an event (:class:`HostTokens`), so the
step's launch never waits for it; the engine reads it when it applies the step. On CPU the copy is a plain
synchronous one behind the same interface, so everything but the stream is tested there.
"""

from __future__ import annotations

import torch

PLACEHOLDER = 0  # what the host writes in an input row the device fills (any valid id: it is overwritten)


def scatter_tokens(input_ids: torch.Tensor, sampled: torch.Tensor, sources: torch.Tensor) -> None:
    """``input_ids[i] = sampled[sources[i]]`` for each ``i < len(sources)`` with ``sources[i] >= 0``.

    Rows with source -1 (their token came from the host) and rows at or past ``len(sources)`` (the rest
    of the step, its padding) are left as they are. Every op runs on the tensors' device, in stream order
    after the buffer's host-to-device copy, with no host sync.

    Args:
        input_ids: (T,) int64, the step's input-id buffer (written in place).
        sampled: (S,) int64, the last step's sampled tokens, on the same device.
        sources: (R,) int64 with R <= T, each -1 or a row of ``sampled``.
    """
    n = sources.shape[0]
    if n == 0 or sampled.numel() == 0:
        return
    head = input_ids[:n]  # (R,)
    picked = sampled.index_select(0, sources.clamp(min=0))  # (R,) row 0 stands in for -1, then dropped
    head.copy_(torch.where(sources >= 0, picked, head))


def decode_sources(seq_ids: list[int], last_rows: dict[int, int]) -> list[int]:
    """For each decode row of the next step (its sequence's id), the row of the last step's sampled
    tokens that holds its input token, or -1 when that token did not come from the last step."""
    return [last_rows.get(s, -1) for s in seq_ids]


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


class HostTokens:
    """The host copy of one step's sampled ids (S,) int64.

    On CUDA the copy is queued on a side stream, after the sampling on the current stream, into pinned
    memory, and an event marks its end: :meth:`ready` polls it and :meth:`tolist` waits for it only. On CPU
    the tensor already is on the host (a synchronous copy, ready at once).
    """

    def __init__(self, tokens: torch.Tensor):
        self.device_tokens = tokens  # (S,) the next step's scatter reads these
        self.event: torch.cuda.Event | None = None
        if tokens.device.type != "cuda":
            self.host = tokens.clone()
            return
        dev = tokens.device
        stream = _side_streams.setdefault(dev, torch.cuda.Stream(dev))
        self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(dev))  # after the sampling kernels
        with torch.cuda.stream(stream):
            self.host.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        tokens.record_stream(stream)  # the allocator keeps the tensor until the side stream is done

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return [int(t) for t in self.host.tolist()]
