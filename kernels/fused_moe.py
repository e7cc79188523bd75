"""Fused MoE on the GPU: block alignment of the sorted assignments, and the two grouped GEMM launches.

``out[t] = sum_j w[t, j] * W2_e (silu(x_t W1_e^T) * (x_t W3_e^T))``, ``e = ids[t, j]``, as in vLLM's
``fused_moe`` / ``moe_wna16``:

1. :func:`align_blocks` sorts the A = T * top_k assignments by expert and pads each expert's run to a
   multiple of ``BLOCK_M`` (padding id A), with the expert of every block; all sizes are bounded by the
   input shapes (A + E * (BLOCK_M - 1) slots), so nothing syncs with the host.
2. GEMM 1 (``qserve.kernels.fused_moe_triton``): ``H[id] = x[id // top_k] @ W13_e^T``, (A, 2I) in x's dtype.
3. ``silu(gate) * up`` in torch: (A, I).
4. GEMM 2: ``Y[id] = act[id] @ W2_e^T * w[id]``, (A, H) in float32, then the sum over top_k and the cast.

Weights are the layouts of :mod:`qserve.kernels.moe` kinds ``float`` / ``int8`` / ``int4`` (qserve's layout
stacked over experts). Assignments with ids outside [0, E) (padding rows) get no block and contribute 0.
Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qserve.kernels.quant_matmul_configs import HAS_TRITON
from qserve.kernels.quant_matmul_launch import _call, _dot_dtype

BLOCK_M, BLOCK_N, BLOCK_K = 16, 32, 32  # tl.dot needs >= 16; tuned on a GPU later (bench/gpu.sh)
_WEIGHTS = {"float": 0, "int8": 1, "int4": 2}


def align_blocks(topk_ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """Sorted, block-padded assignment ids and the expert of each block.

    Returns:
        sorted_ids int32 (L,) with L = A + E * (block_m - 1) rounded up to block_m: each expert's assignment
            ids (token-major order kept) padded with A to whole blocks, experts in order, then A to the end;
        expert_ids int32 (L / block_m,): the expert of each block, -1 past the last run.
    """
    a = topk_ids.numel()
    flat = topk_ids.reshape(-1).long()  # (A,)
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # invalid -> sentinel E
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # (E + 1,)
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m  # (E,)
    run_end = torch.cumsum(padded, 0)  # (E,) end slot of each expert's run
    run_start = run_end - padded
    order = torch.argsort(flat, stable=True)  # (A,) assignments by expert
    e_sorted = flat[order]
    first = torch.cumsum(counts, 0) - counts  # (E + 1,) index in `order` of each expert's first assignment
    rank = torch.arange(a, device=flat.device) - first[e_sorted]  # (A,) position within its expert
    length = -(-(a + num_experts * (block_m - 1)) // block_m) * block_m
    valid = e_sorted < num_experts
    slot = torch.where(valid, run_start[e_sorted.clamp(max=num_experts - 1)] + rank, length)  # dump: length
    sorted_ids = torch.full((length + 1,), a, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, slot, order.to(torch.int32))
    block_start = torch.arange(0, length, block_m, device=flat.device)  # (L / BM,)
    e_of_block = torch.searchsorted(run_end, block_start, right=True)  # first run ending after the start
    expert_ids = torch.where(e_of_block < num_experts, e_of_block, -1).to(torch.int32)
    return sorted_ids[:length], expert_ids


def _grouped_gemm(
    a: Tensor,
    w: Tensor,
    scales: Tensor | None,
    zeros: Tensor | None,
    out: Tensor,
    routed: Tensor | None,
    sorted_ids: Tensor,
    expert_ids: Tensor,
    n: int,
    k: int,
    top_k: int,
    kind: str,
    group_size: int,
) -> None:
    from qserve.kernels.fused_moe_triton import _fused_moe_kernel

    s = scales if scales is not None else w
    z = zeros if zeros is not None else w
    s_strides = (s.stride(0), s.stride(1), s.stride(2) if s.dim() == 3 else 0)
    z_strides = (z.stride(0), z.stride(1), z.stride(2) if z.dim() == 3 else 0)
    args: list[Any] = [
        a, w, s, z, out, routed if routed is not None else a, sorted_ids, expert_ids,
        n, k, a.shape[0] * top_k, max(group_size, 1),
        *a.stride(), *w.stride(), *s_strides, *z_strides, *out.stride(),
    ]  # fmt: skip
    meta = {
        "TOP_K": top_k,
        "WEIGHTS": _WEIGHTS[kind],
        "MUL_ROUTED": routed is not None,
        "DOT_DTYPE": _dot_dtype(a),
        "BLOCK_M": BLOCK_M,
        "BLOCK_N": BLOCK_N,
        "BLOCK_K": BLOCK_K,
    }
    grid = (expert_ids.numel(), -(-n // BLOCK_N))
    _call(_fused_moe_kernel, grid, args, meta)


def fused_moe_triton(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w13: Tensor,
    w2: Tensor,
    kind: str,
    inter: int,
    w13_scales: Tensor | None = None,
    w2_scales: Tensor | None = None,
    w13_zeros: Tensor | None = None,
    w2_zeros: Tensor | None = None,
    group_size: int = -1,
) -> Tensor:
    """The fused MoE (module docstring): (T, H) -> (T, H) in x's dtype. Inputs validated by the caller.

    Raises:
        RuntimeError: triton is not installed.
        ValueError: a kind this kernel does not take (the CPU-packed kinds). Any int4 group size dividing K
            works: the kernel looks up each element's group.
    """
    if not HAS_TRITON:
        raise RuntimeError("the fused MoE kernel needs triton installed (pip install 'qserve[gpu]')")
    if kind not in _WEIGHTS:
        raise ValueError(f"fused_moe_triton takes float, int8 or int4 experts, got {kind!r}")
    t, top_k = topk_ids.shape
    hidden = x.shape[1]
    if t == 0:
        return x.new_zeros((0, hidden))
    a_count = t * top_k
    sorted_ids, expert_ids = align_blocks(topk_ids, w13.shape[0], BLOCK_M)
    x = x.contiguous()
    h = torch.zeros(a_count, 2 * inter, dtype=x.dtype, device=x.device)  # (A, 2I)
    _grouped_gemm(x, w13, w13_scales, w13_zeros, h, None, sorted_ids, expert_ids, 2 * inter, hidden, top_k,
                  kind, group_size)  # fmt: skip
    act = (F.silu(h[:, :inter].float()) * h[:, inter:].float()).to(x.dtype)  # (A, I)
    y = torch.zeros(a_count, hidden, dtype=torch.float32, device=x.device)  # (A, H); padding rows stay 0
    routed = topk_weights.reshape(-1).float().contiguous()  # (A,)
    _grouped_gemm(act, w2, w2_scales, w2_zeros, y, routed, sorted_ids, expert_ids, hidden, inter, 1, kind,
                  group_size)  # fmt: skip
    return y.view(t, top_k, hidden).sum(dim=1).to(x.dtype)
