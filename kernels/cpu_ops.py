"""The CPU path as ``torch.library`` custom ops, so a model that calls them compiles with no graph break.

Inductor fuses the small element-wise ops around them (norms, RoPE, SiLU x up, residual adds) and calls
these as opaque kernels:

* ``qserve::paged_attention_cpu``: store this step's K/V into the paged cache, then attend
  (`paged_attention_cpu`, every KV dtype). It reads the per-sequence lengths from tensors, so one compiled
  graph serves every batch composition, and it skips padding: rows past ``query_start_loc[-1]`` write
  nothing (their slot is -1) and attend nothing (their output is 0), and sequences of length 0 are padding.
* ``qserve::linear_packed``: a bf16 matmul on a weight prepacked in oneDNN's blocked layout (inductor's own
  lowering of ``mkldnn._linear_pointwise`` only accepts weights it prepacked itself).

A step's decode sequences have the same block tables in every layer, so the decode gather rows and mask are
built once per step: the caller opens `step_plans()` around the forward and every layer's call reuses the
plan the first one left there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from qserve.kernels import cpu_native
from qserve.kernels.attention import DecodePlan, KVLayout, paged_attention_cpu, store_kv

# Plans of the step in progress, keyed by cache shape and window; None outside `step_plans()`.
_step_plans: dict[tuple[int, ...], DecodePlan] | None = None


@contextlib.contextmanager
def step_plans() -> Iterator[None]:
    """Let the attention calls of one forward share their decode plan (the block tables must not change
    inside the block)."""
    global _step_plans
    outer, _step_plans = _step_plans, {}
    try:
        yield
    finally:
        _step_plans = outer


def batch_layout(seq_lens: list[int], query_start_loc: list[int]) -> tuple[int, int]:
    """(real sequences, leading decodes) of a padded batch: padding sequences have length 0 and come last;
    decodes are the leading sequences with one query token."""
    b = len(seq_lens)
    while b and seq_lens[b - 1] == 0:
        b -= 1
    d = 0
    while d < b and query_start_loc[d + 1] - query_start_loc[d] == 1:
        d += 1
    return b, d


@torch.library.custom_op("qserve::paged_attention_cpu", mutates_args=("kv_cache",))
def paged_attention_cpu_op(
    q: torch.Tensor,  # (T, Hq, D), RoPE applied; rows past query_start_loc[-1] are padding
    k: torch.Tensor,  # (T, Hkv, D)
    v: torch.Tensor,  # (T, Hkv, D)
    kv_cache: torch.Tensor,  # one layer's cache (kernels.attention / kernels.kv_quant layout)
    slot_mapping: torch.Tensor,  # (T,) int64, -1 on padding rows
    block_tables: torch.Tensor,  # (S, max_blocks) int32
    seq_lens: torch.Tensor,  # (S,) int32, 0 for padding sequences (last)
    query_start_loc: torch.Tensor,  # (S + 1,) int32, constant over padding sequences
    scale: float,
    block_size: int,
    head_dim: int,
    bits: int,
    sliding_window: int,  # 0: none
) -> torch.Tensor:
    lens, qsl = seq_lens.tolist(), query_start_loc.tolist()
    b, num_decodes = batch_layout(lens, qsl)
    n = qsl[b]  # real token rows
    layout = KVLayout(block_size, head_dim, bits)
    out = torch.zeros_like(q) if n < q.shape[0] else torch.empty_like(q)
    if b == 0:
        return out
    kn, vn = k[:n], v[:n]
    store_kv(kn, vn, kv_cache, slot_mapping[:n], layout)
    d = 0  # leading decodes already attended
    if num_decodes and cpu_native.attention_available():
        # the step's decodes through the native kernel (their K/V are stored above: every slot -1 here),
        # the prefills below; a mixed step at concurrency 32 is mostly decodes
        d = num_decodes
        out[:d] = cpu_native.decode_attention(
            q[:d],
            k[:d],
            v[:d],
            kv_cache,
            slot_mapping.new_full((d,), -1),
            block_tables[:d],
            seq_lens[:d],
            scale,
            block_size,
            head_dim,
            bits,
            sliding_window,
        )
        if d == b:
            return out
    # decode rows are one token each, so the rest start at token row d
    out[d:n] = paged_attention_cpu(
        q[d:n],
        kv_cache,
        block_tables[d:b],
        lens[d:b],
        [x - d for x in qsl[d : b + 1]],
        num_decodes - d,
        scale,
        layout,
        sliding_window or None,
        new_kv=(kn[d:], vn[d:]),
        plans=_step_plans,
    )
    return out


@paged_attention_cpu_op.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    block_size: int,
    head_dim: int,
    bits: int,
    sliding_window: int,
) -> torch.Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("qserve::linear_packed", mutates_args=())
def linear_packed(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x (..., K) bf16 @ W^T + b, W prepacked by ``mkldnn._reorder_linear_weight`` -> (..., N)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@linear_packed.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)
