"""qserve's native bf16 linear (kernels/cpu_gemm.cpp) against oneDNN's prepacked bf16 linear, by batch size.

    .venv/bin/python bench/cpu_linear.py [--threads 1,2] [--calls 2000]

Per (N, K) weight shape (the demo model's four projections and its tied lm_head, an odd 1000 x 130) and token
count M it prints the wall time per call of each kernel, timed interleaved (A B A B) in one process, their
ratio (oneDNN / native: above 1 means native is faster) and each kernel's max relative error against fp32.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch

from qserve.kernels import cpu_native

SHAPES = [(384, 256), (256, 256), (1536, 256), (256, 768), (4096, 256), (1000, 130)]  # (N, K)
MS = [1, 2, 4, 8, 32, 128, 512]


def per_call_us(f: Callable[[], object], calls: int) -> float:
    for _ in range(max(calls // 20, 5)):
        f()
    t = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    if not cpu_native.available():
        raise SystemExit("the native kernels do not run here (AVX512-BF16 and a C++ compiler needed)")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(
            f"threads {threads}: native / oneDNN us per call (oneDNN / native), max rel. error native / oneDNN"
        )
        for n, k in SHAPES:
            g = torch.Generator().manual_seed(n + k)
            w = (torch.randn(n, k, generator=g) / 16).bfloat16()
            bias = torch.randn(n, generator=g).bfloat16()
            panels = cpu_native.pack_bf16(w)
            onednn = torch.ops.mkldnn._reorder_linear_weight(w, 64)
            cells = []
            for m in MS:
                x = torch.randn(m, k, generator=g).bfloat16()
                ref = x.float() @ w.float().t() + bias.float()

                native = functools.partial(cpu_native.linear_bf16, x, panels, bias, n)
                dnn = functools.partial(torch.ops.mkldnn._linear_pointwise, x, onednn, bias, "none", [], "")

                errs = [((f().float() - ref).abs().max() / ref.abs().max()).item() for f in (native, dnn)]
                calls = args.calls if m <= 32 else max(args.calls // 10, 20)
                a1, b1, a2, b2 = (per_call_us(f, calls) for f in (native, dnn, native, dnn))
                a, b = min(a1, a2), min(b1, b2)
                cells.append(f"M={m}: {a:.1f}/{b:.1f} ({b / a:.2f}x) e={errs[0]:.0e}/{errs[1]:.0e}")
            print(f"  {n} x {k}  " + " | ".join(cells))


if __name__ == "__main__":
    main()
