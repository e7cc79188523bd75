"""QuantLinear (int4 g128, int8) against a bf16 nn.Linear on CPU: ms per call and speed-up.

    nice -n 10 .venv/bin/python bench/quant_linear_speed.py [--reps 20] [--threads N] [--json FILE]

Shapes are Llama-3-8B's attention (4096x4096) and MLP up (4096 -> 14336) projections; batch = tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch import nn

from qserve.kernels.packing import QuantSpec, quantize
from qserve.layers.quant_linear import QuantLinear


def _time(fn: Callable[[], torch.Tensor], reps: int) -> float:
    """Best wall time of one call, in ms (best-of: the 2-core machine is shared, contention only adds)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for k, n in ((4096, 4096), (4096, 14336)):
        w = torch.randn(n, k, dtype=torch.bfloat16) * 0.02  # (N, K)
        dense = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        dense.weight.data.copy_(w)
        layers = {}
        for kind in ("int4", "int8"):
            g = 128 if kind == "int4" else -1
            spec = QuantSpec.from_config(
                {"quant_method": "qserve", "format_version": 1, "weights": kind, "group_size": g}
            )
            assert spec is not None
            layer = QuantLinear(k, n, False, spec, torch.bfloat16, "cpu")
            layer.load([quantize(w, kind, 128).tensors()])
            layers[kind] = layer
        for batch in (1, 8, 64):
            x = torch.randn(batch, k, dtype=torch.bfloat16)
            with torch.inference_mode():
                base = _time(lambda x=x, dense=dense: dense(x), args.reps)
                row = {"shape": f"{k}x{n}", "batch": batch, "bf16_ms": round(base, 3)}
                for kind, layer in layers.items():
                    ms = _time(lambda x=x, layer=layer: layer(x), args.reps)
                    row[f"{kind}_ms"] = round(ms, 3)
                    row[f"{kind}_speedup"] = round(base / ms, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| shape (K x N) | batch | bf16 ms | int4 g128 ms | int4 speed-up | int8 ms | int8 speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['batch']} | {r['bf16_ms']:.2f} | {r['int4_ms']:.2f} | {r['int4_speedup']:.2f}x "
            f"| {r['int8_ms']:.2f} | {r['int8_speedup']:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
