"""Paged decode attention on a GPU: fp16 / int8 / int4 KV caches in the Triton kernels against torch SDPA.

    python bench/attention.py              # correctness, headline timings, a launch-config sweep (~2-3 min, H200)
    python bench/attention.py --no-sweep   # correctness and headline timings only (~1 min)
    python bench/attention.py --out DIR    # DIR/attention.json and DIR/attention.md (default bench/out; also $OUT)
    python bench/attention.py --dry-run    # no GPU: tiny shapes on CPU in Triton's interpreter (checks the script)

Headline (issue 6): decode, batch 64 x context 4096, Llama-3-8B heads (32 query, 8 KV, head_dim 128), block
size 16, blocks shuffled over the cache. Goals: int8 >= 1.7x and int4 >= 2.5x faster than fp16 in the same
kernel family; the fp16 kernel within 1.3x of torch SDPA over contiguous fp16 K/V. SDPA is timed twice:
queries folded to (B, Hkv, G, D) so every K/V byte is read once (equivalent for decode: no mask), and with
enable_gqa=True; the faster is the baseline.

Order: environment and copy bandwidth (ceiling for %copy); correctness (store bit-exact vs the torch
reference; attention on a mixed decode + chunked-prefill batch and on the headline batch vs
paged_attention_ref: the run stops on a failure); headline timings with default launch parameters (and the
store kernel); a sweep of BLOCK_N x warps x stages and of decode split sizes per KV dtype; goals, table.
GB/s counts the cache bytes read once (values + fp16 scales/zeros) plus q and out.
"""

from __future__ import annotations

import argparse
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

from qserve.kernels.attention import KVLayout, paged_attention_ref, store_kv
from qserve.kernels.kv_quant import block_bytes
from qserve.kernels.paged_attention import AttentionConfig, paged_attention_triton, store_kv_triton

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"fp16": 0, "int8": 8, "int4": 4}
GOALS = {"int8 vs fp16": 1.7, "int4 vs fp16": 2.5, "fp16 vs SDPA": 1 / 1.3}
DEV = "cuda"
SHAPE = dict(batch=64, context=4096, hq=32, hkv=8, head_dim=128, block_size=16)
DRY_SHAPE = dict(batch=2, context=48, hq=4, hkv=2, head_dim=32, block_size=16)
DRY_CONFIG = AttentionConfig(decode_block_n=16, prefill_block_m=16, prefill_block_n=16, partition_size=32)


def bench(fn: Callable[[], Any]) -> float:
    """Median microseconds per call, L2 flushed before each run (triton.testing.do_bench)."""
    if DEV == "cpu":  # --dry-run: one timed call
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])[0]) * 1e3


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy, bytes read plus written."""
    src = torch.empty(2**30 if DEV == "cuda" else 2**20, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-6) / 1e9


def environment() -> dict[str, Any]:
    import triton

    name = torch.cuda.get_device_name() if DEV == "cuda" else platform.processor() or "cpu"
    return dict(
        device=name, torch=torch.__version__, triton=triton.__version__, python=platform.python_version()
    )


class Batch:
    """A decode batch: q (B, Hq, D) fp16, one paged cache per KV dtype (same K/V), contiguous K/V for SDPA."""

    def __init__(self, batch: int, context: int, hq: int, hkv: int, head_dim: int, block_size: int) -> None:
        g = torch.Generator(device=DEV).manual_seed(0)
        self.hq, self.hkv, self.d, self.bs = hq, hkv, head_dim, block_size
        self.seq_lens = [context] * batch
        nblk = -(-context // block_size)
        num_blocks = batch * nblk
        perm = torch.randperm(num_blocks, generator=g, device=DEV)
        self.tables = perm.view(batch, nblk).to(torch.int32)  # (B, nblk) shuffled blocks
        self.q = torch.randn(batch, hq, head_dim, generator=g, device=DEV).half()  # (B, Hq, D)
        k = torch.randn(batch, hkv, context, head_dim, generator=g, device=DEV).half()  # (B, Hkv, L, D)
        v = torch.randn(batch, hkv, context, head_dim, generator=g, device=DEV).half()
        self.k, self.v = k, v  # contiguous, for SDPA
        pos = torch.arange(context, device=DEV)
        slots = (self.tables[:, pos // block_size].long() * block_size + pos % block_size).reshape(-1)
        self.caches: dict[str, torch.Tensor] = {}
        for kind, bits in KINDS.items():
            layout = self.layout(kind)
            if bits:
                shape: tuple[int, ...] = (2, hkv, num_blocks, block_bytes(block_size, head_dim, bits))
                cache = torch.zeros(shape, dtype=torch.uint8, device=DEV)
            else:
                cache = torch.zeros(2, hkv, num_blocks, block_size, head_dim, dtype=torch.float16, device=DEV)
            for b in range(batch):  # (L, Hkv, D) per sequence
                rows = slots[b * context : (b + 1) * context]
                store_kv_triton(k[b].transpose(0, 1), v[b].transpose(0, 1), cache, rows, layout)
            self.caches[kind] = cache
        self.seq_lens_t = torch.tensor(self.seq_lens, dtype=torch.int32, device=DEV)
        self.qsl_t = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
        self.qsl = list(range(batch + 1))

    def layout(self, kind: str) -> KVLayout:
        return KVLayout(self.bs, self.d, KINDS[kind])

    def cache_bytes(self, kind: str) -> int:
        """Bytes of K/V the batch reads (values + scales/zeros), plus q and out."""
        tokens = sum(self.seq_lens) * self.hkv * 2  # (K|V, head, token) rows
        per_row = self.d * 2 if kind == "fp16" else self.d * KINDS[kind] // 8 + 4
        return tokens * per_row + 2 * self.q.numel() * 2

    def fn(self, kind: str, config: AttentionConfig | None = None) -> Callable[[], torch.Tensor]:
        cache, layout, scale = self.caches[kind], self.layout(kind), self.d**-0.5
        b = self.q.shape[0]
        if DEV == "cpu":
            config = config or DRY_CONFIG
        return lambda: paged_attention_triton(
            self.q,
            cache,
            self.tables,
            self.seq_lens_t,
            self.qsl_t,
            b,
            scale,
            layout,
            max_seq_len=max(self.seq_lens),
            config=config,
        )

    def sdpa_folded(self) -> Callable[[], torch.Tensor]:
        b, g = self.q.shape[0], self.hq // self.hkv
        qf = self.q.view(b, self.hkv, g, self.d)  # (B, Hkv, G, D): the group's heads as queries
        return lambda: F.scaled_dot_product_attention(qf, self.k, self.v)

    def sdpa_gqa(self) -> Callable[[], torch.Tensor]:
        q4 = self.q.unsqueeze(2)  # (B, Hq, 1, D)
        return lambda: F.scaled_dot_product_attention(q4, self.k, self.v, enable_gqa=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item())


def check_store(shape: dict[str, int]) -> list[dict[str, Any]]:
    """store_kv_triton bit-exact with the torch reference (store_kv / store_kv_quant) for every KV dtype."""
    t, hkv, d, bs = 4096 if DEV == "cuda" else 40, shape["hkv"], shape["head_dim"], shape["block_size"]
    rows = []
    for kind, bits in KINDS.items():
        layout = KVLayout(bs, d, bits)
        k = torch.randn(t, hkv, d, device=DEV).half() * 3
        v = torch.randn(t, hkv, d, device=DEV).half()
        nb = -(-t // bs) + 4
        slots = torch.randperm(nb * bs, device=DEV)[:t]
        if bits:
            want = torch.zeros(2, hkv, nb, block_bytes(bs, d, bits), dtype=torch.uint8, device=DEV)
        else:
            want = torch.zeros(2, hkv, nb, bs, d, dtype=torch.float16, device=DEV)
        got = want.clone()
        store_kv(k, v, want, slots, layout)
        store_kv_triton(k, v, got, slots, layout)
        exact = bool(torch.equal(got, want))
        rows.append(dict(check="store", kind=kind, tokens=t, exact=exact, ok=exact))
        print(f"  store {kind}: {'bit-exact' if exact else 'MISMATCH'}", flush=True)
    return rows


def check_attention(batch: Batch, shape: dict[str, int]) -> list[dict[str, Any]]:
    """Triton vs paged_attention_ref: the headline batch (first 8 sequences) and a mixed batch per KV dtype."""
    rows = []
    hq, hkv, d, bs = shape["hq"], shape["hkv"], shape["head_dim"], shape["block_size"]
    n = min(8, batch.q.shape[0])
    for kind in KINDS:
        out = batch.fn(kind)()[:n]
        ref = paged_attention_ref(
            batch.q[:n],
            batch.caches[kind],
            batch.tables[:n],
            batch.seq_lens[:n],
            batch.qsl[: n + 1],
            d**-0.5,
            batch.layout(kind),
        )
        err = rel_err(out, ref)
        rows.append(dict(check="decode headline", kind=kind, rel_err=err, ok=err <= 1e-2))
        print(f"  decode {kind} (B={n} of the headline batch): max err / max |ref| = {err:.2e}", flush=True)
    # mixed: 6 decodes of assorted lengths, a full prefill, a chunk continuing a context, a short prefill
    g = torch.Generator().manual_seed(1)
    scale_len = 1 if DEV == "cuda" else 0
    seq_lens = [7, 300, 1000, 2049, 64, 4000] if scale_len else [7, 40, 17, 33, 5, 48]
    seq_lens += [700, 1500, 33] if scale_len else [20, 33, 3]
    query_lens = [1] * 6 + ([700, 200, 33] if scale_len else [20, 9, 3])
    qsl = [0]
    for ql in query_lens:
        qsl.append(qsl[-1] + ql)
    for kind, bits in KINDS.items():
        layout = KVLayout(bs, d, bits)
        width = max(-(-s // bs) for s in seq_lens)
        nb = len(seq_lens) * width
        tables = torch.randperm(nb, generator=g).view(len(seq_lens), width).to(torch.int32).to(DEV)
        if bits:
            cache = torch.zeros(2, hkv, nb, block_bytes(bs, d, bits), dtype=torch.uint8, device=DEV)
        else:
            cache = torch.zeros(2, hkv, nb, bs, d, dtype=torch.float16, device=DEV)
        for i, s in enumerate(seq_lens):
            pos = torch.arange(s, device=DEV)
            slots = tables[i, pos // bs].long() * bs + pos % bs
            kv = torch.randn(2, s, hkv, d, device=DEV).half()
            store_kv_triton(kv[0], kv[1], cache, slots, layout)
        q = torch.randn(qsl[-1], hq, d, device=DEV).half()
        out = paged_attention_triton(
            q,
            cache,
            tables,
            torch.tensor(seq_lens, device=DEV),
            torch.tensor(qsl, device=DEV),
            6,
            d**-0.5,
            layout,
            config=None if DEV == "cuda" else DRY_CONFIG,
        )
        ref = paged_attention_ref(q, cache, tables, seq_lens, qsl, d**-0.5, layout)
        err = rel_err(out, ref)
        ok = err <= 1e-2 and bool(torch.isfinite(out).all())
        rows.append(dict(check="mixed decode+prefill", kind=kind, rel_err=err, ok=ok))
        print(f"  mixed decode + chunked prefill {kind}: max err / max |ref| = {err:.2e}", flush=True)
    return rows


def sweep(batch: Batch, kind: str, deadline: float) -> list[dict[str, Any]]:
    """us per call over BLOCK_N x warps (2 stages), then stages and split sizes around the best."""
    rows: list[dict[str, Any]] = []

    def run(cfg: AttentionConfig) -> float | None:
        if time.time() > deadline:
            return None
        try:
            us = bench(batch.fn(kind, cfg))
        except Exception as e:  # an out-of-resources config: record and move on
            print(f"    {kind} {cfg}: failed ({type(e).__name__}: {str(e)[:80]})", flush=True)
            return None
        rows.append(
            dict(
                kind=kind,
                block_n=cfg.decode_block_n,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                partition_size=cfg.partition_size,
                us=us,
            )
        )
        return us

    for block_n in (32, 64, 128):
        for warps in (4, 8):
            run(AttentionConfig(decode_block_n=block_n, num_warps=warps, num_stages=2))
    if not rows:
        return rows
    best = min(rows, key=lambda r: r["us"])
    for stages in (1, 3, 4):
        run(AttentionConfig(decode_block_n=best["block_n"], num_warps=best["num_warps"], num_stages=stages))
    best = min(rows, key=lambda r: r["us"])
    for part in (2048, 1024, 512):
        run(
            AttentionConfig(
                best["block_n"],
                num_warps=best["num_warps"],
                num_stages=best["num_stages"],
                partition_size=part,
            )
        )
    return rows


def main() -> int:
    global DEV
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU in Triton's interpreter")
    ap.add_argument("--budget-s", type=float, default=420, help="stop sweeping after this many seconds")
    args = ap.parse_args()
    t_start = time.time()
    torch.manual_seed(0)  # the checks' unseeded inputs: one run's verdict is every run's
    if args.dry_run:  # before triton is imported (environment()): its library is @jit code decorated then
        os.environ["TRITON_INTERPRET"] = "1"
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("bench/attention.py needs a CUDA device (or --dry-run)", file=sys.stderr)
        return 2
    shape = DRY_SHAPE if args.dry_run else SHAPE
    result: dict[str, Any] = {"env": environment(), "shape": shape}
    print(f"== environment: {result['env']}", flush=True)
    result["copy_gbps"] = copy_bandwidth()
    print(f"  device-to-device copy: {result['copy_gbps']:.0f} GB/s", flush=True)

    print("== correctness", flush=True)
    batch = Batch(**shape)
    checks = check_store(shape) + check_attention(batch, shape)
    result["correctness"] = checks
    if not all(c["ok"] for c in checks):
        write(result, args.out)
        print("correctness FAILED: timings skipped", flush=True)
        return 1

    print("== headline timings (default launch parameters)", flush=True)
    timings: dict[str, float] = {kind: bench(batch.fn(kind)) for kind in KINDS}
    timings["sdpa_folded"] = bench(batch.sdpa_folded())
    timings["sdpa_gqa"] = bench(batch.sdpa_gqa())
    for kind in KINDS:
        layout, cache = batch.layout(kind), batch.caches[kind]
        for t in (64, 8192) if DEV == "cuda" else (8,):
            kv = torch.randn(2, t, batch.hkv, batch.d, device=DEV).half()
            slots = torch.randperm(cache.shape[2] * batch.bs, device=DEV)[:t]
            for name, store in (("store", store_kv_triton), ("store_ref", store_kv)):
                call = lambda f=store, kv=kv, s=slots, c=cache, lo=layout: f(kv[0], kv[1], c, s, lo)
                timings[f"{name}_{kind}_T{t}"] = bench(call)
    result["timings_us"] = timings
    for name, us in timings.items():
        print(f"  {name:24s} {us:9.1f} us", flush=True)

    if not args.no_sweep:
        print("== launch-config sweep", flush=True)
        deadline = t_start + args.budget_s
        rows = [r for kind in KINDS for r in sweep(batch, kind, deadline)]
        result["sweep"] = rows
        for kind in KINDS:
            mine = [r for r in rows if r["kind"] == kind]
            if mine:
                best = min(mine, key=lambda r: r["us"])
                timings[f"{kind}_tuned"] = min(best["us"], timings[kind])
                print(f"  best {kind}: {best}", flush=True)

    summarize(result, batch)
    write(result, args.out)
    if os.environ.get("OUT") and Path(os.environ["OUT"]).resolve() != Path(args.out).resolve():
        write(result, os.environ["OUT"])
    print(f"done in {time.time() - t_start:.0f} s", flush=True)
    return 0


def summarize(result: dict[str, Any], batch: Batch) -> None:
    t = result["timings_us"]
    sdpa = min(t["sdpa_folded"], t["sdpa_gqa"])
    lines = [
        "| KV dtype | us / call | GB/s | % of copy | vs fp16 | vs SDPA |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind in KINDS:
        us = t[kind]
        gbps = batch.cache_bytes(kind) / (us * 1e-6) / 1e9
        lines.append(
            f"| {kind} | {us:.1f} | {gbps:.0f} | {100 * gbps / result['copy_gbps']:.0f}% | "
            f"{t['fp16'] / us:.2f}x | {sdpa / us:.2f}x |"
        )
    lines.append(
        f"| SDPA fp16 contiguous (folded {t['sdpa_folded']:.1f}, enable_gqa {t['sdpa_gqa']:.1f}) | "
        f"{sdpa:.1f} | {batch.cache_bytes('fp16') / (sdpa * 1e-6) / 1e9:.0f} | | | 1.00x |"
    )
    goals = []
    for suffix in ("", "_tuned"):
        if f"fp16{suffix}" not in t:
            continue
        got = {
            "int8 vs fp16": t[f"fp16{suffix}"] / t[f"int8{suffix}"],
            "int4 vs fp16": t[f"fp16{suffix}"] / t[f"int4{suffix}"],
            "fp16 vs SDPA": sdpa / t[f"fp16{suffix}"],
        }
        for name, goal in GOALS.items():
            ok = got[name] >= goal
            goals.append(
                dict(
                    config="default" if not suffix else "best of sweep",
                    goal=name,
                    want=goal,
                    got=got[name],
                    ok=ok,
                )
            )
    result["goals"] = goals
    result["table_md"] = "\n".join(lines)
    s = result["shape"]
    print(
        f"\n== decode B={s['batch']} x L={s['context']}, Hq={s['hq']} Hkv={s['hkv']} D={s['head_dim']} "
        f"block {s['block_size']} on {result['env']['device']}"
    )
    print(result["table_md"])
    for g in goals:
        print(
            f"  goal {g['goal']} >= {g['want']:.2f}x ({g['config']}): {g['got']:.2f}x "
            f"{'PASS' if g['ok'] else 'FAIL'}"
        )


def write(result: dict[str, Any], out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention.json").write_text(json.dumps(result, indent=2, default=str))
    if "table_md" in result:
        (out / "attention.md").write_text(result["table_md"] + "\n")
    print(f"  wrote {out / 'attention.json'}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
