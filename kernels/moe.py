"""Mixture-of-experts expert compute: ``out[t] = sum_j w[t, j] * Expert_{ids[t, j]}(x[t])``, grouped by expert.

Every expert is a SwiGLU MLP: ``Expert_e(x) = W2_e (silu(x W1_e^T) * (x W3_e^T))``, with gate and up fused
as ``W13_e = [W1_e; W3_e]`` of shape (2I, H) and ``W2_e`` of shape (H, I) (Hugging Face v5's ``gate_up_proj``
and ``down_proj``).

The grouped path (:func:`moe_experts`, the ``qserve::moe_experts`` custom op) sorts the T*top_k (token,
expert) assignments by expert, gathers each expert's rows into one contiguous block, runs one GEMM per expert
that has rows (a loop over experts, never over tokens), gathers the results back into (token, slot) order
and sums each token's weighted slots in float32. Assignments whose expert id lies outside ``[0, E)`` are dropped, so a caller may mark
padded rows with ``-1``. Weight layouts (``kind``):

* ``"float"``: ``w13`` (E, 2I, H) and ``w2`` (E, H, I) in any float dtype.
* ``"cpu-int4"``: torch's CPU weight-only int4 form, per expert: ``w13`` uint8 (E, N13, H/2) from
  ``aten._convert_weight_to_int4pack_for_cpu`` with N13 = 2I padded to a multiple of 16, ``w13_scales``
  bf16 (E, H/G, N13, 2) scale/zero pairs; ``w2``/``w2_scales`` alike with N2 = H padded. Runs in bfloat16.
* ``"cpu-int8"``: ``w13`` int8 (E, 2I, H), ``w13_scales`` bf16 (E, 2I); ``w2`` int8 (E, H, I) alike. bfloat16.
* ``"cpu-bf16"``: bf16 experts prepacked for oneDNN, one tensor per expert, through the separate op
  :func:`moe_experts_packed` (``qserve::moe_experts_packed``): the layout cannot be stacked.
* ``"int4"`` / ``"int8"``: qserve's layout (:mod:`qserve.kernels.packing`) stacked over experts
  (``w13`` (E, 2I, H/2) uint8 or (E, 2I, H) int8, scales, and for int4 ``w13_zeros``/``w2_zeros``), computed
  on CUDA by the fused Triton kernel, elsewhere per expert by the reference dequantize + matmul.

On CUDA (and under ``TRITON_INTERPRET=1``) float16/bfloat16 activations with ``float``, ``int8`` or ``int4``
experts take the fused Triton kernel instead (:mod:`qserve.kernels.fused_moe`: one grouped GEMM per projection
over block-aligned sorted assignments, as vLLM's fused_moe); everything else takes the grouped loop.

The op has a fake implementation, so models that call it stay ``torch.compile``-able (the grouped loop is
opaque to the compiler: its only data-dependent step, the per-expert row counts, stays inside the op).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MOE_KINDS = ("float", "cpu-int4", "cpu-int8", "int4", "int8")


def _use_triton(x: Tensor) -> bool:
    from qserve.kernels.quant_matmul_configs import HAS_TRITON
    from qserve.kernels.quant_matmul_launch import _interpreting

    return HAS_TRITON and x.dtype in (torch.float16, torch.bfloat16) and (x.is_cuda or _interpreting())


_CPU_DTYPE = torch.bfloat16


def moe_experts_ref(x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """Token-by-token reference (tests only): float ``w13`` (E, 2I, H), ``w2`` (E, H, I) -> (T, H) in x's dtype.

    Computed in float32; ids outside [0, E) contribute nothing.
    """
    t, k = topk_ids.shape
    e_count, inter = w13.shape[0], w2.shape[2]
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    for i in range(t):
        for j in range(k):
            e = int(topk_ids[i, j])
            if not 0 <= e < e_count:
                continue
            h = x[i].float() @ w13[e].float().T  # (2I,)
            y = (F.silu(h[:inter]) * h[inter:]) @ w2[e].float().T  # (H,)
            out[i] += topk_weights[i, j].float() * y
    return out.to(x.dtype)


def _check(
    x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: Tensor, w2: Tensor, kind: str, hidden: int
) -> None:
    if kind not in MOE_KINDS:
        raise ValueError(f"moe_experts: unknown kind {kind!r}; use one of {', '.join(MOE_KINDS)}")
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"moe_experts: x must be (T, {hidden}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"moe_experts: x must be a float tensor, got {x.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"moe_experts: topk_ids must be (T, top_k), got {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"moe_experts: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"moe_experts: topk_weights {tuple(topk_weights.shape)} != topk_ids {tuple(topk_ids.shape)}"
        )
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0]:
        raise ValueError(
            f"moe_experts: w13 and w2 must be (E, ., .) with one E, got {tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    if kind == "float" and (
        w13.shape[2] != hidden or w2.shape[1] != hidden or w13.shape[1] != 2 * w2.shape[2]
    ):
        raise ValueError(
            f"moe_experts: float experts need w13 (E, 2I, {hidden}) and w2 (E, {hidden}, I), "
            f"got {tuple(w13.shape)}, {tuple(w2.shape)}"
        )


def _expert_matmul(
    rows: Tensor,
    w: Tensor,
    scales: Tensor | None,
    zeros: Tensor | None,
    kind: str,
    group_size: int,
    n: int,
    k: int,
) -> Tensor:
    """rows (R, K) @ expert weight^T -> (R, n) in rows' dtype; ``w`` etc. are one expert's slices."""
    if kind == "float":
        return F.linear(rows, w)
    if kind == "cpu-int4":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(_CPU_DTYPE), w, group_size, scales)
        return y[:, :n].to(rows.dtype)  # (R, N') -> (R, n): padded output rows sliced off
    if kind == "cpu-int8":
        return torch.ops.aten._weight_int8pack_mm(rows.to(_CPU_DTYPE), w, scales).to(rows.dtype)
    from qserve.kernels.packing import QuantizedWeight
    from qserve.kernels.quant_matmul import quant_matmul

    assert scales is not None
    qw = QuantizedWeight(w, scales, zeros, kind, group_size if kind == "int4" else -1, k, n)
    return quant_matmul(rows, qw)


@torch.library.custom_op("qserve::moe_experts", mutates_args=())
def moe_experts_op(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w13: Tensor,
    w2: Tensor,
    w13_scales: Tensor | None,
    w2_scales: Tensor | None,
    w13_zeros: Tensor | None,
    w2_zeros: Tensor | None,
    kind: str,
    group_size: int,
    inter: int,
    hidden: int,
) -> Tensor:
    """The grouped expert compute (module docstring). Returns (T, hidden) in x's dtype."""
    _check(x, topk_ids, topk_weights, w13, w2, kind, hidden)
    if kind in ("float", "int8", "int4") and _use_triton(x):
        from qserve.kernels.fused_moe import fused_moe_triton

        return fused_moe_triton(
            x, topk_ids, topk_weights, w13, w2, kind, inter, w13_scales, w2_scales, w13_zeros, w2_zeros,
            group_size,
        )  # fmt: skip

    def expert(e: int, r: Tensor) -> Tensor:  # (c, H) rows of expert e -> (c, H)
        z13 = None if w13_zeros is None else w13_zeros[e]
        z2 = None if w2_zeros is None else w2_zeros[e]
        s13 = None if w13_scales is None else w13_scales[e]
        s2 = None if w2_scales is None else w2_scales[e]
        h = _expert_matmul(r, w13[e], s13, z13, kind, group_size, 2 * inter, hidden)  # (c, 2I)
        act = F.silu(h[:, :inter]) * h[:, inter:]  # (c, I)
        return _expert_matmul(act, w2[e], s2, z2, kind, group_size, hidden, inter)

    return _grouped(x, topk_ids, topk_weights, w13.shape[0], expert)


def _grouped(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    num_experts: int,
    expert: Callable[[int, Tensor], Tensor],
) -> Tensor:
    """Sort assignments by expert, run ``expert(e, rows)`` once per expert with rows, gather back, sum."""
    t, top_k = topk_ids.shape
    hidden = x.shape[1]
    if t == 0:
        return x.new_zeros((0, hidden))
    flat = topk_ids.reshape(-1).long()  # (A,) A = T * top_k assignments
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # invalid -> sentinel E
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert, token order within one
    counts = torch.bincount(flat, minlength=num_experts + 1).tolist()  # (E + 1,) rows per expert
    valid = sum(counts[:num_experts])
    order = order[:valid]  # sentinel rows sort last: drop them
    rows = x[order // top_k]  # (A', H): each sorted assignment's token, gathered once
    ys = torch.empty(valid, hidden, dtype=x.dtype, device=x.device)  # (A', H) expert outputs
    start = 0
    for e in range(num_experts):
        c = counts[e]
        if c == 0:
            continue
        ys[start : start + c] = expert(e, rows[start : start + c])
        start += c
    # Back to (token, slot) order by a gather, not a scatter-add over H (which is ~100x slower on CPU here):
    # inv[a] = row of ys holding assignment a, or the zero row for dropped assignments.
    ys = torch.cat([ys, ys.new_zeros(1, hidden)])  # (A' + 1, H)
    inv = torch.full((t * top_k,), valid, dtype=torch.long, device=x.device)
    inv[order] = torch.arange(valid, device=x.device)
    per_slot = ys[inv].view(t, top_k, hidden).float()  # (T, k, H)
    w = topk_weights.float().unsqueeze(-1)  # (T, k, 1)
    return (per_slot * w).sum(dim=1).to(x.dtype)


@torch.library.custom_op("qserve::moe_experts_packed", mutates_args=())
def moe_experts_packed(
    x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: list[Tensor], w2: list[Tensor], inter: int
) -> Tensor:
    """Kind ``cpu-bf16``: the grouped loop on bf16 experts prepacked for oneDNN, one tensor per expert.

    ``w13[e]`` / ``w2[e]`` come from ``torch.ops.mkldnn._reorder_linear_weight`` of (2I, H) / (H, I) bf16
    weights (oneDNN's blocked layout cannot be stacked, hence lists); results are those of ``F.linear`` on the
    unpacked weights. x (T, H) -> (T, H) in x's dtype; ids outside [0, E) are ignored.
    """
    if len(w13) != len(w2) or not w13:
        raise ValueError(f"moe_experts_packed: {len(w13)} gate/up and {len(w2)} down experts")

    def expert(e: int, r: Tensor) -> Tensor:
        r = r.to(torch.bfloat16)
        h = torch.ops.mkldnn._linear_pointwise(r, w13[e], None, "none", [], "")  # (c, 2I)
        act = F.silu(h[:, :inter]) * h[:, inter:]  # (c, I)
        return torch.ops.mkldnn._linear_pointwise(act, w2[e], None, "none", [], "").to(x.dtype)

    return _grouped(x, topk_ids, topk_weights, len(w13), expert)


@moe_experts_packed.register_fake
def _(
    x: Tensor, topk_ids: Tensor, topk_weights: Tensor, w13: list[Tensor], w2: list[Tensor], inter: int
) -> Tensor:
    return x.new_empty(x.shape)


@moe_experts_op.register_fake
def _(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w13: Tensor,
    w2: Tensor,
    w13_scales: Tensor | None,
    w2_scales: Tensor | None,
    w13_zeros: Tensor | None,
    w2_zeros: Tensor | None,
    kind: str,
    group_size: int,
    inter: int,
    hidden: int,
) -> Tensor:
    _check(x, topk_ids, topk_weights, w13, w2, kind, hidden)
    return x.new_empty((x.shape[0], hidden))


def moe_experts(
    x: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    w13: Tensor,
    w2: Tensor,
    *,
    kind: str = "float",
    inter: int | None = None,
    w13_scales: Tensor | None = None,
    w2_scales: Tensor | None = None,
    w13_zeros: Tensor | None = None,
    w2_zeros: Tensor | None = None,
    group_size: int = -1,
) -> Tensor:
    """``out[t] = sum_j topk_weights[t, j] * Expert_{topk_ids[t, j]}(x[t])`` (module docstring).

    Args:
        x: (T, H) activations, float. T may be 0.
        topk_ids: (T, top_k) int32/int64 expert ids; ids outside [0, E) are ignored (padding).
        topk_weights: (T, top_k) routing weights, any float dtype (applied in float32).
        w13, w2: the experts' stacked weights in the layout ``kind`` names; ``inter`` is I (needed for the
            quantized kinds, whose packed shapes do not show it).

    Returns:
        (T, H) in x's dtype, each token's sum accumulated in float32.

    Raises:
        ValueError / TypeError: shapes or dtypes that do not fit together, or an unknown kind.
    """
    hidden = x.shape[-1]
    if inter is None:
        if kind != "float":
            raise ValueError(f"moe_experts: kind {kind!r} needs inter (the experts' intermediate size)")
        inter = w2.shape[2]
    out: Tensor = torch.ops.qserve.moe_experts(
        x, topk_ids, topk_weights, w13, w2, w13_scales, w2_scales, w13_zeros, w2_zeros, kind, group_size,
        inter, hidden,
    )  # fmt: skip
    return out
