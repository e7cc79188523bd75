"""W4A16 / W8A16 Triton matmul on a GPU against torch's fp16 matmul, on Llama-3-8B layer shapes.

    python bench/kernel_timings.py                 # everything: about 3-5 minutes on an H200, autotuning included
    python bench/kernel_timings.py --quick         # two shapes, fewer M: a smoke run
    python bench/kernel_timings.py --out DIR       # results in DIR/kernels.json and DIR/kernels.csv (default bench/out)
    python bench/kernel_timings.py --dry-run       # no GPU: tiny shapes on CPU in Triton's interpreter (checks the script)

Order: environment; copy bandwidth (a 1 GiB device-to-device copy, the ceiling for the %copy column);
correctness of every format and regime against a float32 reference (the run stops on a failure); timings
(triton.testing.do_bench, median of cold-L2 runs) per shape and M for fp16 (F.linear), int4 (group 128) and
int8 through the public op, plus each regime forced where two compete (gemv vs gemm at small M, gemm vs
dequant at large M: the data for GEMV_MAX_M and DEQUANT_MIN_M); a split-K sweep at M = 1 and 16; host
overhead per call; then the goals, the recommended constants, and the table, last.
Shapes are (K, N) = (in_features, out_features): q/o proj, fused qkv, gate/up, down.
GB/s counts weight + activation + output bytes once; %copy divides by the copy's GB/s (read + write).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(4096, 4096), (4096, 6144), (4096, 14336), (14336, 4096)]  # (K, N)
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
GROUP = 128
GOALS = {"int4 M=1": 3.0, "int4 M=16": 2.0, "int8 M=1": 1.8, "never slower": 1.0}
DEV = "cuda"  # "cpu" with --dry-run


def bench(fn: Callable[[], Any], warmup: int = 10, rep: int = 50) -> tuple[float, float, float]:
    """(median, p20, p80) in microseconds, L2 flushed before every run (triton.testing.do_bench)."""
    if DEV == "cpu":  # --dry-run: one timed call
        t0 = time.perf_counter()
        fn()
        t = (time.perf_counter() - t0) * 1e6
        return t, t, t
    import triton.testing

    q = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return q[0] * 1e3, q[1] * 1e3, q[2] * 1e3


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.empty(2**30 if DEV == "cuda" else 2**24, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    t, _, _ = bench(lambda: dst.copy_(src), warmup=20, rep=200)
    src_bytes = src.numel()
    return 2 * src_bytes / (t * 1e-6) / 1e9


def host_overhead_us(fn: Callable[[], Any], n: int = 200) -> float:
    """Wall-clock microseconds per call of back-to-back calls (warm L2): launch overhead at small M."""
    n = n if DEV == "cuda" else 1
    for _ in range(min(n, 10)):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n * 1e6


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


class Layer:
    """One (K, N) layer in fp16 and quantized to int4 (group 128) and int8, on the GPU."""

    def __init__(self, k: int, n: int, seed: int) -> None:
        from qserve.kernels.packing import quantize

        g = torch.Generator(device=DEV).manual_seed(seed)
        self.k, self.n = k, n
        self.w = (torch.randn(n, k, generator=g, device=DEV) * 0.02).half()  # (N, K)
        self.q = {"int4": quantize(self.w, "int4", GROUP), "int8": quantize(self.w, "int8")}

    def weight_bytes(self, kind: str) -> int:
        return self.w.numel() * 2 if kind == "fp16" else self.q[kind].nbytes

    def fn(
        self, kind: str, x: torch.Tensor, path: str = "auto", split_k: int | None = None
    ) -> Callable[[], Any]:
        from qserve.kernels import quant_matmul
        from qserve.kernels.quant_matmul import matmul_int4_triton, matmul_int8_triton

        if kind == "fp16":
            return lambda: F.linear(x, self.w)
        qw = self.q[kind]
        if path == "auto" and split_k is None:
            return lambda: quant_matmul(x, qw)
        if kind == "int4":
            assert qw.zeros is not None
            z = qw.zeros
            return lambda: matmul_int4_triton(x, qw.qweight, qw.scales, z, GROUP, path=path, split_k=split_k)
        return lambda: matmul_int8_triton(x, qw.qweight, qw.scales, path=path, split_k=split_k)


def check_correctness(layers: list[Layer], ms: list[int], deadline: float) -> list[dict[str, Any]]:
    """Relative error of every format and regime against x.float() @ dequant(W).float().T."""
    rows: list[dict[str, Any]] = []
    torch.backends.cuda.matmul.allow_tf32 = False
    for layer in layers:
        for kind in ("int4", "int8"):
            w32 = layer.q[kind].dequantize(torch.float32)
            for m in ms:
                if time.time() > deadline:
                    print("  time budget spent: correctness check cut short", flush=True)
                    return rows
                for path in ("auto", "gemv", "gemm", "dequant"):
                    if (path == "gemv" and m > 16) or (path == "gemm" and m > 1024):
                        continue
                    x = torch.randn(m, layer.k, device=DEV).half()
                    out = layer.fn(kind, x, path)()
                    ref = x.float() @ w32.T
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    ok = bool(torch.isfinite(out).all()) and err <= 1e-2
                    rows.append(dict(k=layer.k, n=layer.n, kind=kind, m=m, path=path, rel_err=err, ok=ok))
                    if not ok:
                        print(
                            f"FAILED {kind} K={layer.k} N={layer.n} M={m} {path}: rel err {err:.3g}",
                            flush=True,
                        )
    return rows


def time_layer(layer: Layer, ms: list[int], copy_gbps: float, deadline: float) -> list[dict[str, Any]]:
    rows = []
    for m in ms:
        if time.time() > deadline:
            print(f"  time budget spent: skipping M >= {m}", flush=True)
            break
        x = torch.randn(m, layer.k, device=DEV).half()
        io_bytes = (m * layer.k + m * layer.n) * 2
        t16 = bench(layer.fn("fp16", x))[0]
        variants = [("fp16", "auto")] + [(kind, "auto") for kind in ("int4", "int8")]
        alt = ["gemv", "gemm"] if m <= 16 else ["gemm", "dequant"] if m >= 64 else []
        variants += [(kind, p) for kind in ("int4", "int8") for p in alt]
        for kind, path in variants:
            t, lo, hi = (t16, 0.0, 0.0) if kind == "fp16" else bench(layer.fn(kind, x, path))
            nbytes = layer.weight_bytes(kind) + io_bytes
            gbps = nbytes / (t * 1e-6) / 1e9
            rows.append(
                dict(k=layer.k, n=layer.n, m=m, kind=kind, path=path, us=t, us_p20=lo, us_p80=hi,
                     bytes=nbytes, gbps=gbps, pct_copy=100 * gbps / copy_gbps, speedup_vs_fp16=t16 / t)
            )  # fmt: skip
        r = {(row["kind"], row["path"]): row for row in rows if row["m"] == m}
        print(
            f"  K={layer.k:5} N={layer.n:5} M={m:4}  fp16 {t16:8.1f} us   int4 {r['int4', 'auto']['us']:8.1f} us"
            f" ({r['int4', 'auto']['speedup_vs_fp16']:4.2f}x)   int8 {r['int8', 'auto']['us']:8.1f} us"
            f" ({r['int8', 'auto']['speedup_vs_fp16']:4.2f}x)",
            flush=True,
        )
    return rows


def split_k_sweep(layer: Layer, deadline: float) -> list[dict[str, Any]]:
    from qserve.kernels.quant_matmul import choose_path, split_k_for
    from qserve.kernels.quant_matmul_configs import _num_sms

    rows: list[dict[str, Any]] = []
    for m in (1, 16):
        x = torch.randn(m, layer.k, device=DEV).half()
        path = choose_path(m)
        chosen = split_k_for(path, m, layer.n, layer.k, _num_sms(x.device))
        for kind in ("int4", "int8"):
            for split in (1, 2, 4, 8):
                if time.time() > deadline:
                    return rows
                t = bench(layer.fn(kind, x, path, split))[0]
                rows.append(dict(k=layer.k, n=layer.n, m=m, kind=kind, path=path, split_k=split, us=t,
                                 heuristic=chosen))  # fmt: skip
    return rows


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals per shape: int4 >= 3x at M=1, >= 2x at M=16, int8 >= 1.8x at M=1, never < 1x."""
    out: dict[str, Any] = {}
    auto = [r for r in rows if r["path"] == "auto" and r["kind"] != "fp16"]
    for k, n in sorted({(r["k"], r["n"]) for r in auto}):
        sp = {(r["kind"], r["m"]): r["speedup_vs_fp16"] for r in auto if (r["k"], r["n"]) == (k, n)}
        worst = min(sp.values())
        res = {
            "int4 M=1": sp.get(("int4", 1)),
            "int4 M=16": sp.get(("int4", 16)),
            "int8 M=1": sp.get(("int8", 1)),
            "never slower": worst,
        }
        out[f"{k}x{n}"] = {name: (v, v is not None and v >= GOALS[name]) for name, v in res.items()}
    return out


def recommend(rows: list[dict[str, Any]], sweep: list[dict[str, Any]]) -> dict[str, Any]:
    """GEMV_MAX_M, DEQUANT_MIN_M and split-K choices suggested by the forced-path timings."""
    t = {(r["k"], r["n"], r["m"], r["kind"], r["path"]): r["us"] for r in rows}
    shapes = sorted({(r["k"], r["n"]) for r in rows})
    ms = sorted({r["m"] for r in rows})

    def all_faster(m: int, a: str, b: str) -> bool | None:
        keys = [(k, n, m, kind) for k, n in shapes for kind in ("int4", "int8")]
        pairs = [(t[(*key, a)], t[(*key, b)]) for key in keys if (*key, a) in t and (*key, b) in t]
        return all(x <= y for x, y in pairs) if pairs else None

    gemv_max = max([m for m in ms if all_faster(m, "gemv", "gemm")] or [None])
    dequant_min = min([m for m in ms if all_faster(m, "dequant", "gemm")] or [None])
    best_split = {}
    for k, n in shapes:
        for m in (1, 16):
            for kind in ("int4", "int8"):
                cands = [r for r in sweep if (r["k"], r["n"], r["m"], r["kind"]) == (k, n, m, kind)]
                if cands:
                    b = min(cands, key=lambda r: r["us"])
                    best_split[f"{kind} {k}x{n} M={m}"] = {
                        "best": b["split_k"],
                        "heuristic": cands[0]["heuristic"],
                    }
    return {"GEMV_MAX_M (largest M where gemv beat gemm everywhere)": gemv_max,
            "DEQUANT_MIN_M (smallest M where dequant beat gemm everywhere)": dequant_min,
            "split_k": best_split}  # fmt: skip


def autotune_choices() -> dict[str, dict[str, str]]:
    """The config each autotuner picked, per key (BLOCK_M or M bucket, N, K, [group], split, dtypes)."""
    from qserve.kernels import quant_matmul_launch as mod  # holds the four autotuned kernels

    out = {}
    for name in ("_W4_GEMV", "_W4_GEMM", "_W8_GEMV", "_W8_GEMM"):
        tuner = getattr(mod, name, None)
        out[name] = {str(k): str(v) for k, v in getattr(tuner, "cache", {}).items()}
    return out


def table(rows: list[dict[str, Any]]) -> str:
    auto = {(r["k"], r["n"], r["m"], r["kind"]): r for r in rows if r["path"] == "auto"}
    lines = [
        f"{'K x N':>12} {'M':>5} | {'fp16 us':>8} | {'int4 us':>8} {'x':>5} {'GB/s':>6} {'%copy':>5} |"
        f" {'int8 us':>8} {'x':>5} {'GB/s':>6} {'%copy':>5}"
    ]
    for k, n, m, kind in sorted(auto):
        if kind != "fp16":
            continue
        a, b, c = auto[k, n, m, "fp16"], auto.get((k, n, m, "int4")), auto.get((k, n, m, "int8"))
        cells = []
        for r in (b, c):
            cells.append(
                f"{r['us']:8.1f} {r['speedup_vs_fp16']:5.2f} {r['gbps']:6.0f} {r['pct_copy']:5.0f}"
                if r
                else " " * 27
            )
        lines.append(f"{f'{k}x{n}':>12} {m:5} | {a['us']:8.1f} | {cells[0]} | {cells[1]}")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import triton

    if DEV == "cpu":
        return dict(gpu=None, dry_run=True, torch=torch.__version__, triton=triton.__version__)
    props = torch.cuda.get_device_properties(0)
    return dict(
        gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version(),
        autotune=os.environ.get("QSERVE_AUTOTUNE", "1"),
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out", help="folder for kernels.json / .csv")
    ap.add_argument("--quick", action="store_true", help="two shapes, M in 1, 16, 256, 4096")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop timing new rows after this long")
    ap.add_argument(
        "--dry-run", action="store_true", help="no GPU: tiny shapes in Triton's interpreter on CPU"
    )
    args = ap.parse_args()
    global DEV
    if args.dry_run:
        DEV = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("bench/kernel_timings.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    start = time.time()
    deadline = start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = SHAPES[:2] if args.quick else SHAPES
    ms = [1, 16, 256, 4096] if args.quick else MS
    check_ms = [1, 3, 16, 33, 256, 1024]
    if args.dry_run:
        shapes, ms, check_ms = [(256, 192), (128, 320)], [1, 4, 16, 64, 1024], [1, 3, 33, 1024]
    result: dict[str, Any] = {"env": environment(), "shapes_kn": shapes, "ms": ms}
    print("env:", json.dumps(result["env"]), flush=True)

    def save() -> None:
        (args.out / "kernels.json").write_text(json.dumps(result, indent=1))

    result["copy_gbps"] = copy_bw = copy_bandwidth()
    print(f"copy bandwidth: {copy_bw:.0f} GB/s (read + write)", flush=True)
    layers = [Layer(k, n, seed=i) for i, (k, n) in enumerate(shapes)]

    print("correctness (autotunes as it goes) ...", flush=True)
    result["correctness"] = check = check_correctness(layers, check_ms, deadline)
    save()
    if not all(r["ok"] for r in check):
        print("correctness FAILED: no timings", flush=True)
        return 1
    print(f"correctness ok: {len(check)} cases, worst rel err {max(r['rel_err'] for r in check):.2e}"
          f" [{time.time() - start:.0f} s]", flush=True)  # fmt: skip

    rows: list[dict[str, Any]] = []
    result["rows"] = rows
    for layer in layers:
        rows += time_layer(layer, ms, copy_bw, deadline)
        save()
    print(f"timings done [{time.time() - start:.0f} s]", flush=True)

    sweep: list[dict[str, Any]] = []
    result["split_k_sweep"] = sweep
    for layer in layers:
        sweep += split_k_sweep(layer, deadline + 60)
    save()
    x1 = torch.randn(1, layers[0].k, device=DEV).half()
    result["host_us_per_call_m1"] = {
        kind: host_overhead_us(layers[0].fn(kind, x1)) for kind in ("fp16", "int4", "int8")
    }
    result["autotune"] = autotune_choices()
    result["goals"] = goals(rows)
    result["recommend"] = recommend(rows, sweep)
    result["elapsed_s"] = time.time() - start
    save()
    with (args.out / "kernels.csv").open("w", newline="") as f:
        cols = [
            "k",
            "n",
            "m",
            "kind",
            "path",
            "us",
            "us_p20",
            "us_p80",
            "bytes",
            "gbps",
            "pct_copy",
            "speedup_vs_fp16",
        ]
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)

    print(f"\nhost overhead per call at M=1 (back-to-back, us): {json.dumps(result['host_us_per_call_m1'])}")
    print("split-K (best vs heuristic):", json.dumps(result["recommend"]["split_k"]))
    print("recommended:", json.dumps({k: v for k, v in result["recommend"].items() if k != "split_k"}))
    print("\ngoals (speedup over fp16, pass):")
    for shape, res in result["goals"].items():
        cells = "  ".join(
            f"{name} {v:.2f}x {'ok' if ok else 'MISS'}" if v is not None else f"{name} -"
            for name, (v, ok) in res.items()
        )
        print(f"  {shape:>10}: {cells}")
    print(
        f"\nresults: {args.out / 'kernels.json'}, {args.out / 'kernels.csv'}  [{result['elapsed_s']:.0f} s]"
    )
    print(f"copy bandwidth {copy_bw:.0f} GB/s; x = speedup over fp16 F.linear; int4 group {GROUP}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
