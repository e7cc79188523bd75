"""Soak: bursty mixed load on loopback (streams, chat, tokenize, clients that hang up mid-request, bad
requests) for QSERVE_SOAK_SECONDS (default 180: long enough for thousands of requests on the 2-core CI
machine, short enough for its 30-minute budget). Afterwards: resident memory of the server and of the
engine process grew less than 5% past warm-up, no KV block is left in use, and every answer was the one
provoked (200, or 400 for the bad requests)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.server.conftest import ServerProcess, httpx, metric, wait_for

SOAK_SECONDS = float(os.environ.get("QSERVE_SOAK_SECONDS", "180"))
WARMUP = 0.2  # share of the run before the memory baseline is taken
BAD = [  # (body, path): each must answer 400
    (b'{"prompt": "x",', "/v1/completions"),
    (json.dumps({"prompt": "x", "max_tokens": 10**6}).encode(), "/v1/completions"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), "/v1/chat/completions"),
    (json.dumps({"prompt": [1, 2, 10**7]}).encode(), "/v1/completions"),
    (json.dumps({"tokens": [-1]}).encode(), "/detokenize"),
]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def one(client: httpx.AsyncClient, rng: random.Random, seen: Counter[str]) -> None:
    kind = rng.choices(["complete", "stream", "chat", "hangup", "bad", "tokenize"], [35, 25, 10, 15, 10, 5])[
        0
    ]
    prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 200)))
    body = {"prompt": prompt, "max_tokens": rng.randint(1, 64), "temperature": rng.choice([0.0, 0.8])}
    if kind == "complete":
        r = await client.post("/v1/completions", json=body)
        seen[f"complete {r.status_code}"] += 1
    elif kind == "chat":
        messages = [{"role": "user", "content": prompt}]
        r = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 16})
        seen[f"chat {r.status_code}"] += 1
    elif kind == "tokenize":
        r = await client.post("/tokenize", json={"prompt": prompt})
        seen[f"tokenize {r.status_code}"] += 1
    elif kind == "bad":
        raw, path = rng.choice(BAD)
        r = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
        seen[f"bad {r.status_code}"] += 1
    else:  # a stream read to the end, or one the client drops after a few chunks
        body = {**body, "stream": True, "max_tokens": 64, "ignore_eos": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            n = 0
            async for line in r.aiter_lines():
                n += line.startswith("data: ")
                if kind == "hangup" and n >= rng.randint(1, 4):
                    break
            seen[f"{kind} {r.status_code}"] += 1


async def load(url: str, seconds: float, on_warm: asyncio.Event) -> Counter[str]:
    rng = random.Random(0)
    seen: Counter[str] = Counter()
    start = time.monotonic()
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        while (now := time.monotonic()) - start < seconds:
            if now - start >= WARMUP * seconds:
                on_warm.set()
            await asyncio.gather(*(one(client, rng, seen) for _ in range(rng.randint(1, 12))))
            await asyncio.sleep(rng.uniform(0, 0.5))
    return seen


@pytest.mark.slow
def test_soak(plain_model: Path, tmp_path: Path) -> None:
    srv = ServerProcess(plain_model, tmp_path / "server.log", "--max-num-seqs", "8", "--stats-interval", "5")
    try:
        pids = {"server": srv.proc.pid, "engine": srv.engine_pid()}

        async def run() -> tuple[Counter[str], dict[str, int]]:
            warm = asyncio.Event()
            task = asyncio.create_task(load(srv.url, SOAK_SECONDS, warm))
            await warm.wait()
            await asyncio.sleep(1.0)
            baseline = {k: rss(p) for k, p in pids.items()}
            return await task, baseline

        seen, baseline = asyncio.run(run())
        total = sum(seen.values())
        assert total > SOAK_SECONDS * 2, seen  # really loaded
        unexpected = {k: n for k, n in seen.items() if not (k.endswith(" 200") or k == "bad 400")}
        assert not unexpected, seen
        assert seen["hangup 200"] > 0 and seen["bad 400"] > 0

        # idle again: every KV block back in the pool, nothing running or waiting
        def idle() -> bool:
            text = httpx.get(srv.url + "/metrics", timeout=10).text
            return (
                metric(text, "qserve_kv_cache_usage_ratio") == 0
                and metric(text, "qserve_requests_running") == 0
                and metric(text, "qserve_requests_waiting") == 0
            )

        assert wait_for(idle, 15), httpx.get(srv.url + "/metrics").text
        text = httpx.get(srv.url + "/metrics", timeout=10).text
        assert 'code="500"' not in text and 'code="429"' not in text
        after = {k: rss(p) for k, p in pids.items()}
        for k in pids:
            growth = after[k] / baseline[k] - 1
            print(f"soak {k}: RSS {baseline[k] >> 20} -> {after[k] >> 20} MiB ({100 * growth:+.2f}%)")
            assert growth < 0.05, (k, baseline[k], after[k])
        out = srv.output()
        assert "Traceback" not in out and "ERROR" not in out, out[-3000:]
        print(f"soak: {total} requests in {SOAK_SECONDS:.0f}s: {dict(seen)}")
    finally:
        srv.stop()
