"""int4 weight-only matmul (torch's CPU kernel, as QuantLinear packs it) against oneDNN bf16, by batch size.

    .venv/bin/python bench/int4_crossover.py [--threads 1]

Prints, per weight shape and M, the CPU time per call of each and their ratio (thread CPU time, so the ratio
holds up better on a shared machine than wall time).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from qserve.kernels.packing import quantize, unpack_int4

SHAPES = [(256, 768), (768, 1792), (2048, 5632)]  # (K, N): demo gate_up, 83M gate_up, a 1B-class MLP
MS = [1, 8, 32, 64, 128]


def per_call_us(f: Callable[[], object], n: int = 200) -> float:
    for _ in range(10):
        f()
    t0 = time.thread_time()
    for _ in range(n):
        f()
    return (time.thread_time() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for k, n in SHAPES:
        w = torch.randn(n, k).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 64)
        qw = quantize(w.float(), "int4", 128)
        assert qw.zeros is not None
        codes = unpack_int4(qw.qweight).to(torch.int32)  # (N, K)
        s, z = qw.scales.float(), qw.zeros.float()
        sz = torch.stack([s, (8.0 - z) * s], -1).transpose(0, 1).bfloat16().contiguous()  # (K/G, N, 2)
        q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        for m in MS:
            x = torch.randn(m, k).bfloat16()
            with torch.inference_mode():
                bf16 = per_call_us(
                    lambda x=x, p=packed: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                )
                int4 = per_call_us(
                    lambda x=x, q=q4, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q, 128, sz)
                )
            print(
                f"K={k:5d} N={n:5d} M={m:4d}  bf16 {bf16:9.1f} us  int4 {int4:9.1f} us  int4/bf16 {int4 / bf16:5.2f}"
            )


if __name__ == "__main__":
    main()
