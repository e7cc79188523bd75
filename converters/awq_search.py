"""The searches behind --method awq, on captured activations: input-channel scales, then weight clipping.

Both minimise the relative output error ``||X W^T - X Q(W)^T||_F / ||X W^T||_F`` of round-to-nearest
``Q`` (kernels/packing.quantize), and both include the identity (s = 1, no clipping) among their candidates,
so they never do worse than plain RTN on the calibration activations.
"""

from __future__ import annotations

import torch

from qserve.converters.plan import Target
from qserve.kernels.packing import quantize

SCALE_GRID = 20  # alphas 0, 1/20, ..., 19/20
CLIP_GRID = 20  # shrink ratios 1, 0.975, ..., 0.525
CLIP_MAX_SHRINK = 0.5
CLIP_TOKENS = 512  # rows of X used in the clipping search
CLIP_ROWS = 1024  # output rows per chunk of the clipping search (bounds its (M, rows, K/G) temporary)


def fake_quant(w: torch.Tensor, target: Target, scale_dtype: torch.dtype) -> torch.Tensor:
    """dequantize(quantize(w)) in float32: what the runtime will multiply by."""
    return quantize(w, target.weights, target.group_size, scale_dtype).dequantize(torch.float32)


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative error of x @ w_hat^T against x @ w^T. x (M, K); w, w_hat (N, K)."""
    y = x @ w.t()  # (M, N)
    return float((x @ w_hat.t() - y).norm()) / (float(y.norm()) or 1.0)


def search_scale(
    x: torch.Tensor,
    w: torch.Tensor,
    target: Target,
    scale_dtype: torch.dtype,
    tie: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, float]:
    """Per-input-channel scale s (K,) minimising the error of Q(W diag(s)) diag(s)^-1 on x.

    Candidates: s = 1, and for a in [0, 1) both ``mean|x|^a / mean|w~|^(1-a)`` (w~: |w| normalised per
    quantization group) and ``mean|x|^a``, normalised to a geometric mean of 1. ``tie`` = (kv_heads,
    group, head_dim) forces channels of query heads that share a KV head to one scale (o_proj under GQA,
    whose scales fold into v_proj rows). Returns (s, alpha); alpha is -1 when s = 1 won.
    """

    def loss(s: torch.Tensor) -> float:
        return output_error(x, w, fake_quant(w * s, target, scale_dtype) / s)

    best, best_loss, best_alpha = torch.ones(w.shape[1]), loss(torch.ones(w.shape[1])), -1.0
    for a, s in scale_candidates(x.abs().mean(0), w, target, tie):
        cur = loss(s)
        if cur < best_loss:
            best, best_loss, best_alpha = s, cur, a
    return best, best_alpha


def scale_candidates(
    x_mean: torch.Tensor, w: torch.Tensor, target: Target, tie: tuple[int, int, int] | None = None
) -> list[tuple[float, torch.Tensor]]:
    """The (alpha, s) candidates of :func:`search_scale` (s = 1 excluded), from mean |x| (K,) and w (N, K)."""

    def tied(s: torch.Tensor) -> torch.Tensor:
        if tie is None:
            return s
        sh = s.log().view(*tie).mean(1, keepdim=True)  # (Hkv, 1, D): geometric mean over the group
        return sh.expand(*tie).reshape(-1).exp()  # (K,)

    x_mean = x_mean.clamp(min=1e-8)  # (K,)
    g = target.group_size if target.weights == "int4" else w.shape[1]
    wg = w.abs().view(w.shape[0], -1, g)  # (N, K/G, G)
    w_mean = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).view_as(w).mean(0).clamp(min=1e-8)  # (K,)
    out = []
    for i in range(SCALE_GRID):
        a = i / SCALE_GRID
        for s in (x_mean.pow(a) / w_mean.pow(1 - a), x_mean.pow(a)):
            out.append((a, tied((s / (s.max() * s.min()).sqrt()).clamp(min=1e-4))))
    return out


def search_clip(x: torch.Tensor, w: torch.Tensor, target: Target, scale_dtype: torch.dtype) -> torch.Tensor:
    """Clip each quantization group of w (N, K) to r x its range, r chosen per group on x (M, K).

    Returns the clipped weight. A group's error is the output error it causes alone (its slice of x
    times its slice of W - Q(W)), so groups are chosen independently; r = 1 (no clipping) is a candidate.
    """
    n, k = w.shape
    g = target.group_size if target.weights == "int4" else k
    x = x[:: max(1, x.shape[0] // CLIP_TOKENS)]
    xg = x.view(x.shape[0], k // g, g)  # (M, K/G, G)
    out = torch.empty_like(w)
    for r0 in range(0, n, CLIP_ROWS):
        wr = w[r0 : r0 + CLIP_ROWS]  # (R, K)
        wg = wr.view(wr.shape[0], k // g, g)  # (R, K/G, G)
        hi, lo = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)  # (R, K/G, 1)
        best_err = torch.full(wg.shape[:2], float("inf"))  # (R, K/G)
        best = wg.clone()
        for i in range(CLIP_GRID):
            r = 1.0 - CLIP_MAX_SHRINK * i / CLIP_GRID
            wc = torch.minimum(torch.maximum(wg, lo * r), hi * r)  # (R, K/G, G)
            d = wg - fake_quant(wc.reshape(wr.shape), target, scale_dtype).view_as(wg)  # (R, K/G, G)
            err = torch.einsum("mjg,rjg->mrj", xg, d).pow(2).sum(0)  # (R, K/G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better[..., None], wc, best)
        out[r0 : r0 + CLIP_ROWS] = best.view(wr.shape)
    return out
