"""Step buffers: bucket choice, padding, and in-place writes (exact state)."""

from __future__ import annotations

import torch

from qserve.engine.step_buffers import StepBuffers, StepShape, step_buffer_bytes, token_buckets


def test_token_buckets_follow_vllm_capture_sizes() -> None:
    assert token_buckets(4) == (1, 2, 4)
    assert token_buckets(20) == (1, 2, 4, 8, 16, 20)
    b = token_buckets(2048)
    assert b[:6] == (1, 2, 4, 8, 16, 24)
    assert b[b.index(248) : b.index(248) + 3] == (248, 256, 272)
    assert b[-1] == 2048 and list(b) == sorted(set(b))
    assert token_buckets(300)[-3:] == (272, 288, 300)


def test_padded_shape_picks_the_smallest_bucket() -> None:
    buf = StepBuffers(max_tokens=64, max_seqs=8, max_blocks=4, device=torch.device("cpu"))
    assert buf.padded_shape(1, 1) == StepShape(1, 1)
    assert buf.padded_shape(3, 3) == StepShape(4, 4)
    assert buf.padded_shape(9, 5) == StepShape(16, 8)  # padding sequences stop at max_seqs
    assert buf.padded_shape(40, 2) == StepShape(40, 8)  # a mixed step: rows and sequences pad apart
    assert buf.padded_shape(41, 2) == StepShape(48, 8)
    assert buf.padded_shape(64, 8) == StepShape(64, 8)
    assert buf.padded_shape(65, 1) is None


def test_fill_writes_in_place_and_pads() -> None:
    buf = StepBuffers(max_tokens=16, max_seqs=4, max_blocks=3, device=torch.device("cpu"))
    storage = {k: t.data_ptr() for k, t in buf.host.items()}
    # one decode (ctx 5, blocks [7, 2]) and a 2-token prefill chunk (ctx 2, block [4]); block size 4
    view = buf.fill(
        input_ids=[11, 12, 13],
        positions=[4, 0, 1],
        slots=[9, 16, 17],
        seq_lens=[5, 2],
        query_start_loc=[0, 1, 3],
        tables=[[7, 2], [4]],
        shape=StepShape(4, 4),
    )
    assert view.input_ids.tolist() == [11, 12, 13, 0]
    assert view.positions.tolist() == [4, 0, 1, 0]
    assert view.slot_mapping.tolist() == [9, 16, 17, -1]
    assert view.seq_lens.tolist() == [5, 2, 0, 0]
    assert view.query_start_loc.tolist() == [0, 1, 3, 3, 3]
    assert view.block_tables.tolist() == [[7, 2, 0], [4, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert view.input_ids.data_ptr() == storage["input_ids"]  # the same storage every step
    # a smaller next step overwrites the rows it uses and re-pads the rest
    view = buf.fill([21], [5], [10], [6], [0, 1], [[7, 2]], StepShape(1, 1))
    assert view.slot_mapping.tolist() == [10]
    assert buf.host["slot_mapping"][:4].tolist() == [10, 16, 17, -1]
    assert {k: t.data_ptr() for k, t in buf.host.items()} == storage


def test_fill_unpadded_shape_is_exact() -> None:
    buf = StepBuffers(max_tokens=16, max_seqs=4, max_blocks=2, device=torch.device("cpu"))
    view = buf.fill([1, 2], [0, 1], [0, 1], [2], [0, 2], [[0]], StepShape(2, 1))
    assert view.input_ids.shape == (2,) and view.seq_lens.shape == (1,)
    assert view.query_start_loc.tolist() == [0, 2] and view.block_tables.shape == (1, 2)
    # one spare row per token and sequence buffer (never a whole-buffer view), + int64 token sources, logits rows
    assert buf.nbytes == (3 * 17) * 8 + (5 + 6 + 10) * 4 + 2 * 4 * 8
    assert buf.host["input_ids"].shape == (17,) and buf.host["block_tables"].shape == (5, 2)


def test_planned_bytes_are_the_allocation() -> None:
    """The planner's step-buffer bytes are what StepBuffers allocates, for many sizes."""
    for tokens, seqs, blocks in ((1, 1, 1), (64, 8, 4), (2048, 256, 256), (8192, 512, 8192), (300, 7, 33)):
        buf = StepBuffers(tokens, seqs, blocks, torch.device("cpu"))
        real = sum(t.numel() * t.element_size() for t in buf.device_bufs.values())
        assert step_buffer_bytes(tokens, seqs, blocks) == buf.nbytes == real
        assert (
            real == 24 * (tokens + 1) + 4 * (2 * (seqs + 1) + 1 + (seqs + 1) * blocks) + 16 * seqs
        )  # spare rows
