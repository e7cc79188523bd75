"""int4 weight-only matmul on CPU against oneDNN bf16, by batch size, with the two fallbacks tried for issue 16.

    .venv/bin/python bench/int4_crossover.py [--threads 1] [--calls 50]

Per weight shape (K, N) and token count M it prints the CPU time per call of:

* ``bf16``: oneDNN on a prepacked bf16 weight (what float Linear runs);
* ``int4``: torch's ``_weight_int4pack_mm_for_cpu`` (what QuantLinear runs on CPU today);
* ``deq``: dequantize the int4 weight (nibble-pair lookup table, then scale and zero) into a bf16 scratch,
  then a bf16 matmul: the GPU path's "dequant above the crossover" idea, int4 at rest;
* ``w4a8``: dynamic per-token int8 activations times the int4 codes unpacked to int8, ``torch._int_mm`` per
  quantization group (VNNI), scales applied in fp32: int4 at rest.

Thread CPU time, so the ratios hold up better on a shared machine than wall time. The variants run
interleaved per M (A B A B).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qserve.kernels.packing import quantize, unpack_int4

SHAPES = [(256, 768), (768, 1792), (2048, 5632)]  # (K, N): demo gate_up, 83M gate_up, a 1B-class MLP
MS = [1, 8, 32, 64, 128, 256]
G = 128

_B = torch.arange(256)
_LUT = torch.stack([(_B & 15) - 8, (_B >> 4) - 8], -1).bfloat16()  # (256, 2): byte -> its two (q - 8)


def per_call_us(f: Callable[[], object], n: int) -> float:
    for _ in range(3):
        f()
    t0 = time.thread_time()
    for _ in range(n):
        f()
    return (time.thread_time() - t0) / n * 1e6


def bench_shape(k: int, n: int, calls: int) -> None:
    """Print one row per M for a (K, N) weight."""
    w = torch.randn(n, k).bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
    qw = quantize(w.float(), "int4", G)
    assert qw.zeros is not None
    codes = unpack_int4(qw.qweight).to(torch.int32)  # (N, K)
    s, z = qw.scales.float(), qw.zeros.float()  # (N, K/G)
    sz = torch.stack([s, (8.0 - z) * s], -1).transpose(0, 1).bfloat16().contiguous()  # (K/G, N, 2)
    q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    pairs = (codes[:, 0::2] + 16 * codes[:, 1::2]).to(torch.int32)  # (N, K/2): low nibble first
    sb, zb = s.bfloat16().unsqueeze(-1), ((8.0 - z) * s).bfloat16().unsqueeze(-1)  # (N, K/G, 1)
    # K-major copies for w4a8: (K/2, N) nibble pairs along K, scales (K/G, N)
    pairs_k = (codes[:, 0::2] + 16 * codes[:, 1::2]).t().contiguous().to(torch.uint8)
    s_k, zb_k = s.t().contiguous(), ((8.0 - z) * s).t().contiguous()

    def deq(pairs: torch.Tensor = pairs, sb: torch.Tensor = sb, zb: torch.Tensor = zb) -> torch.Tensor:
        q = F.embedding(pairs, _LUT).view(n, k // G, G)  # (N, K/G, G) bf16 (q - 8)
        return q.mul_(sb).add_(zb).view(n, k)  # W = (q - 8) * s + (8 - z) * s

    def w4a8(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sx = xf.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127  # (M, 1) per-token scale
        xi = (xf / sx).round_().to(torch.int8)
        lo, hi = (pairs_k & 15).view(torch.int8), (pairs_k >> 4).view(torch.int8)
        wi = torch.stack([lo, hi], 1).view(k, n).sub_(8)  # (K, N) int8 q - 8
        y = xf.view(-1, k // G, G).sum(-1) @ zb_k  # (M, N): the zero-point term
        for g in range(k // G):
            acc = torch._int_mm(xi[:, g * G : (g + 1) * G].contiguous(), wi[g * G : (g + 1) * G])
            y += acc.float() * (s_k[g] * sx)
        return y.bfloat16()

    # The fallbacks must compute the same layer: check them against the fp32 reference once per shape.
    ref_w = qw.dequantize(torch.float32)  # (N, K)
    xc = torch.randn(32, k).bfloat16()
    ref = xc.float() @ ref_w.t()
    with torch.inference_mode():
        err_deq = (deq().float() - ref_w).abs().max().item()
        err_w4a8 = ((w4a8(xc).float() - ref).norm() / ref.norm()).item()
    print(f"K={k:5d} N={n:5d}  deq max |W err| {err_deq:.3g}  w4a8 relative output error {err_w4a8:.3g}")
    for m in MS:
        x = torch.randn(m, k).bfloat16()
        with torch.inference_mode():
            fs: dict[str, Callable[[], object]] = {
                "bf16": lambda x=x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                "int4": lambda x=x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4, G, sz),
                "deq": lambda x=x: F.linear(x, deq()),
            }
            if m > 16:  # torch._int_mm on CPU wants M > 16
                fs["w4a8"] = lambda x=x: w4a8(x)
            t = {name: 0.0 for name in fs}
            for _ in range(2):  # A B A B
                for name, f in fs.items():
                    t[name] += per_call_us(f, calls) / 2
        cols = "  ".join(f"{name} {us:8.0f} us" for name, us in t.items())
        ratios = "  ".join(f"{name}/bf16 {t[name] / t['bf16']:5.2f}" for name in t if name != "bf16")
        print(f"K={k:5d} N={n:5d} M={m:4d}  {cols}  |  {ratios}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for k, n in SHAPES:
        bench_shape(k, n, args.calls)


if __name__ == "__main__":
    main()
