"""Constrained vs unconstrained serving throughput at concurrency 16, and grammar compile time for a large schema.

    .venv/bin/python bench/structured_outputs.py [--rounds 2] [--requests 48] [--max-tokens 64]

Starts `qserve serve demo` once, then runs closed-loop rounds of chat requests at concurrency 16 in the order
A B A B (A: plain sampling, B: the same requests with a JSON-schema response_format), each round's throughput
being completion tokens / wall seconds. The schema asks for a long array so constrained outputs run about as
long as plain ones. Then, in this process, compiles a large schema (80 properties: nested objects, enums,
bounded arrays, integer ranges) against the demo tokenizer, cold and from the cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# (bench/kernels.py, since renamed kernel_timings.py, shadowed the `kernels` package transformers looks for: drop bench/ from the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

LONG: dict[str, Any] = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 12,
            "maxItems": 12,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 0, "maximum": 999},
                    "kind": {"enum": ["alpha", "beta", "gamma"]},
                    "name": {"type": "string", "maxLength": 8},
                },
                "required": ["id", "kind", "name"],
            },
        }
    },
    "required": ["items"],
}


def large_schema(n: int = 80) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for i in range(n):
        kind = i % 5
        if kind == 0:
            props[f"field_{i}"] = {"type": "string", "maxLength": 32}
        elif kind == 1:
            props[f"field_{i}"] = {"type": "integer", "minimum": -1000, "maximum": 100000}
        elif kind == 2:
            props[f"field_{i}"] = {"enum": [f"v{i}_{j}" for j in range(8)]}
        elif kind == 3:
            props[f"field_{i}"] = {
                "type": "array",
                "items": {"type": "number"},
                "minItems": 1,
                "maxItems": 10,
            }
        else:
            props[f"field_{i}"] = {
                "type": "object",
                "properties": {
                    "a": {"type": "boolean"},
                    "b": {"type": "string", "pattern": "^[a-z]{2,6}$"},
                    "c": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 0, "maximum": 9},
                        "maxItems": 4,
                    },
                },
                "required": ["a", "b"],
            }
    return {"type": "object", "properties": props, "required": list(props)[: n // 2]}


async def one_round(
    base: str, n: int, concurrency: int, max_tokens: int, constrained: bool, seed0: int
) -> dict[str, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
    queue = list(range(n))
    tokens = 0
    finished_stop = 0

    async def worker() -> None:
        nonlocal tokens, finished_stop
        while queue:
            i = queue.pop()
            kw: dict[str, Any] = {}
            if constrained:
                kw["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "list", "schema": LONG},
                }
            else:
                kw["extra_body"] = {"ignore_eos": True}
            r = await client.chat.completions.create(
                model="demo",
                messages=[{"role": "user", "content": f"List twelve things, number {i}."}],
                max_tokens=max_tokens,
                temperature=1.0,
                seed=seed0 + i,
                **kw,
            )
            assert r.usage is not None
            tokens += r.usage.completion_tokens
            finished_stop += r.choices[0].finish_reason == "stop"

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"tokens": tokens, "seconds": wall, "tok_s": tokens / wall, "stopped": finished_stop}


def compile_times() -> dict[str, float]:
    from qserve.config import resolve_model_path
    from qserve.engine.structured import GrammarCache
    from qserve.tokenizer import load_tokenizer
    from qserve.types import StructuredOutputsParams

    tok = load_tokenizer(resolve_model_path("demo"))
    cache = GrammarCache(tok, 4096, [tok.eos_token_id])
    t0 = time.perf_counter()
    cache.submit(StructuredOutputsParams(json={"type": "object"})).result()  # tokenizer info + first compile
    warm = time.perf_counter() - t0
    schema = large_schema()
    t0 = time.perf_counter()
    cache.submit(StructuredOutputsParams(json=schema)).result()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache.submit(StructuredOutputsParams(json=json.dumps(schema))).result()
    hit = time.perf_counter() - t0
    return {
        "schema_bytes": len(json.dumps(schema)),
        "setup_s": warm,
        "cold_s": cold,
        "hit_s": hit,
        "compile_s": cache.compile_seconds[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="A B pairs")
    ap.add_argument("--requests", type=int, default=48, help="per round")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--compile-only", action="store_true")
    args = ap.parse_args()
    print("compile:", json.dumps(compile_times()), flush=True)
    if args.compile_only:
        return
    cmd = [
        sys.executable,
        "-m",
        "qserve.cli",
        "serve",
        "demo",
        "--port",
        str(args.port),
        "--max-num-seqs",
        "16",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=dict(os.environ))
    base = f"http://127.0.0.1:{args.port}"
    try:
        import httpx2 as httpx

        for _ in range(240):
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        asyncio.run(one_round(base, 16, 16, 8, False, 0))  # warm-up
        asyncio.run(one_round(base, 16, 16, 8, True, 0))
        rows = []
        for r in range(args.rounds):
            for constrained in (False, True):
                res = asyncio.run(
                    one_round(base, args.requests, args.concurrency, args.max_tokens, constrained, 1000 * r)
                )
                rows.append((constrained, res))
                print(("B constrained" if constrained else "A plain"), json.dumps(res), flush=True)
        a = sum(x["tokens"] for c, x in rows if not c) / sum(x["seconds"] for c, x in rows if not c)
        b = sum(x["tokens"] for c, x in rows if c) / sum(x["seconds"] for c, x in rows if c)
        print(f"plain {a:.1f} tok/s, constrained {b:.1f} tok/s, ratio {b / a:.3f}")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
