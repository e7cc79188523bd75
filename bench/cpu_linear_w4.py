"""qserve's native int4 linear (kernels/cpu_gemm_w4.cpp) against torch's CPU int4 kernel and qserve's native
bf16 linear, by batch size.

    .venv/bin/python bench/cpu_linear_w4.py [--threads 1,2] [--calls 2000] [--group-size 128]

Per (N, K) weight shape (the demo model's projections and a 1B-class MLP) and token count M it prints the wall
time per call of native int4 (`linear_w4`), torch int4 (`_weight_int4pack_mm_for_cpu`, QuantLinear's path
before) and native bf16 (`linear_bf16` on the dequantized weight), timed interleaved (A B C A B C) in one
process, and the ratios bf16 / native int4 and torch int4 / native int4 (above 1: native int4 is faster).
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch

from qserve.kernels import cpu_native
from qserve.kernels.packing import QuantizedWeight, pack_int4
from qserve.layers.quant_linear import pack_cpu_int4

SHAPES = [(384, 256), (1536, 256), (256, 768), (4096, 256), (11264, 2048), (2048, 5632)]  # (N, K)
MS = [1, 2, 4, 8, 16, 32, 128, 512]


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
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--shapes", default="", help="N x K list, e.g. 384x256,1536x256 (default: all)")
    args = ap.parse_args()
    if not cpu_native.available():
        raise SystemExit("the native kernels do not run here (AVX512-BF16 and a C++ compiler needed)")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    g_size = args.group_size
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        print(f"threads {threads}: us per call native int4 / torch int4 / native bf16 (bf16/w4, torch/w4)")
        for n, k in shapes:
            g = torch.Generator().manual_seed(n + k)
            q = torch.randint(0, 16, (n, k), generator=g)
            s = torch.rand(n, k // g_size, generator=g) / 64 + 1e-3
            z = torch.randint(0, 16, (n, k // g_size), generator=g).float()
            qw = QuantizedWeight(pack_int4(q), s.bfloat16(), z.bfloat16(), "int4", g_size, k, n)
            w = qw.dequantize(torch.bfloat16)  # (N, K)
            w4p = cpu_native.pack_w4(q, s.bfloat16().float(), z, g_size)
            t_packed, t_sz = pack_cpu_int4(qw)
            panels = cpu_native.pack_bf16(w)
            cells = []
            for m in MS:
                x = torch.randn(m, k, generator=g).bfloat16()
                ref = x.float() @ w.float().t()
                w4 = functools.partial(cpu_native.linear_w4, x, w4p, None, n, g_size)
                tint4 = functools.partial(
                    torch.ops.aten._weight_int4pack_mm_for_cpu, x, t_packed, g_size, t_sz
                )
                bf = functools.partial(cpu_native.linear_bf16, x, panels, None, n)
                err = ((w4().float() - ref).abs().max() / ref.abs().max()).item()
                calls = args.calls if m <= 32 else max(args.calls // 10, 20)
                if n * k > 4e6:
                    calls = max(calls // 10, 10)
                t = [per_call_us(f, calls) for f in (w4, tint4, bf, w4, tint4, bf)]
                a, b, c = min(t[0], t[3]), min(t[1], t[4]), min(t[2], t[5])
                cells.append(f"M={m}: {a:.1f}/{b:.1f}/{c:.1f} ({c / a:.2f}x, {b / a:.2f}x) e={err:.0e}")
            print(f"  {n} x {k}\n    " + "\n    ".join(cells))


if __name__ == "__main__":
    main()
