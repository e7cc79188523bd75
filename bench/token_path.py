"""One token's path at concurrency 1 (issue 21): where a served token's time goes.

Two measurements of the same workload (N requests, one at a time, P prompt tokens, T output tokens, ignore_eos):

* ``--url URL`` (a running ``qserve serve``): the client times the gap between consecutive SSE chunks (one chunk
  per engine step at concurrency 1: the served TPOT), and reads the engine's own per-step phase means
  (``qserve_step_seconds{phase}``, a 10 s sliding window, so keep a run under ~10 s) and the host gap between
  steps (``qserve_step_gap_seconds``, differenced over the run) from /metrics. Served TPOT minus the engine's
  step is the cost of everything outside the step: the engine loop, the pipe to the HTTP process, the asyncio
  hand-off, SSE framing, the HTTP server and the client.
* ``--offline``: the bare engine in this process (``LLM``, the same engine config ``qserve serve`` uses by
  default: compiled unless QSERVE_ENFORCE_EAGER=1), each ``engine.step()`` timed; its phases from
  ``engine.metrics()``.

Usage::

    qserve serve demo --port 8011 &
    python bench/token_path.py --url http://127.0.0.1:8011
    python bench/token_path.py --offline --threads 1
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import statistics
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

PHASES = ("schedule", "prepare", "forward", "sample", "detokenize")


@dataclass
class Run:
    """Per-request client timings: TTFT and the gaps between consecutive token chunks (seconds)."""

    ttft: list[float]
    gaps: list[float]


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(length)] for _ in range(n)]


def stream_one(url: str, model: str, prompt: list[int], max_tokens: int) -> tuple[float, list[float]]:
    """POST one streaming completion; return (TTFT, arrival times of every chunk that carried text)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
        }
    )
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"error: server answered {resp.status}: {resp.read()[:300]!r}")
    arrivals = []
    while line := resp.readline():
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        arrivals.append(time.perf_counter())
    conn.close()
    return arrivals[0] - t0, arrivals


def scrape(url: str) -> dict[str, float]:
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for m in re.finditer(r'^qserve_step_seconds\{phase="(\w+)"\} (\S+)$', text, re.M):
        out[m[1]] = float(m[2])
    for name in ("sum", "count"):
        m2 = re.search(rf"^qserve_step_gap_seconds_{name} (\S+)$", text, re.M)
        out[f"gap_{name}"] = float(m2[1]) if m2 else 0.0
    return out


def model_name(url: str) -> tuple[str, int]:
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/v1/models")
    data = json.loads(conn.getresponse().read())["data"][0]
    conn.close()
    return data["id"], int(data.get("vocab_size", 0) or 0)


def served(args: argparse.Namespace) -> dict[str, Any]:
    model, _ = model_name(args.url)
    ps = prompts(args.requests + 1, args.prompt_tokens, args.vocab)
    stream_one(args.url, model, ps[0], args.max_tokens)  # warm-up (compiled shapes, allocator)
    before = scrape(args.url)
    run = Run([], [])
    for p in ps[1:]:
        ttft, arr = stream_one(args.url, model, p, args.max_tokens)
        run.ttft.append(ttft)
        run.gaps.extend(b - a for a, b in zip(arr, arr[1:], strict=False))
    after = scrape(args.url)
    step = {p: after.get(p, 0.0) for p in PHASES}
    n_gap = after["gap_count"] - before["gap_count"]
    gap = (after["gap_sum"] - before["gap_sum"]) / n_gap if n_gap else 0.0
    tpot = statistics.mean(run.gaps)
    step_total = sum(step.values())
    return {
        "mode": "served",
        "tpot_ms": tpot * 1e3,
        "tpot_p50_ms": statistics.median(run.gaps) * 1e3,
        "tpot_p99_ms": sorted(run.gaps)[int(0.99 * (len(run.gaps) - 1))] * 1e3,
        "ttft_ms": statistics.mean(run.ttft) * 1e3,
        "engine_step_ms": {k: v * 1e3 for k, v in step.items()},
        "engine_step_total_ms": step_total * 1e3,
        "engine_loop_gap_ms": gap * 1e3,
        "outside_step_ms": (tpot - step_total) * 1e3,
    }


def offline(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from qserve.engine.llm import LLM
    from qserve.types import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, kv_cache_dtype=args.kv_cache_dtype)
    eng = llm.engine
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0)
    ps = prompts(args.requests + 1, args.prompt_tokens, eng.model_config.vocab_size)
    steps: list[float] = []
    for i, p in enumerate(ps):
        eng.add_request(f"r{i}", None, params, prompt_token_ids=p)
        first = True
        while eng.has_unfinished_requests():
            t = time.perf_counter()
            eng.step()
            dt = time.perf_counter() - t
            if i > 0 and not first:  # decode steps of the timed requests only
                steps.append(dt)
            first = False
    m = eng.metrics()
    phases = m["step_seconds"]  # window: the last 10 s of steps (decode dominated)
    gaps = m["step_gap_seconds"]
    return {
        "mode": "offline",
        "model": args.model,
        "kv_cache_dtype": args.kv_cache_dtype,
        "steps_by_path": dict(eng.runner.steps_by_path),
        "step_ms": statistics.mean(steps) * 1e3,
        "step_p50_ms": statistics.median(steps) * 1e3,
        "engine_step_ms": {k: v * 1e3 for k, v in phases.items()},
        "engine_loop_gap_ms": gaps["sum"] / max(gaps["count"], 1) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running qserve server, e.g. http://127.0.0.1:8011")
    ap.add_argument("--offline", action="store_true", help="time the bare engine in this process")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn below this")
    ap.add_argument("--threads", type=int, default=0, help="offline: torch threads (0: torch's default)")
    ap.add_argument(
        "--model", default="demo", help="offline: model name or directory (e.g. an int4 conversion)"
    )
    ap.add_argument("--kv-cache-dtype", default="auto", help="offline: auto, bf16, int8 or int4")
    args = ap.parse_args()
    if bool(args.url) == bool(args.offline):
        raise SystemExit("error: give exactly one of --url and --offline")
    res = served(args) if args.url else offline(args)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
