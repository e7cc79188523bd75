"""Decode throughput of the quantized demo model against bf16, through qserve's engine on CPU.

    nice -n 10 .venv/bin/python bench/quant_decode_speed.py [--reps 5] [--tokens 64] [--threads N]

Needs the converted models of bench/quant_quality.py (bench/out/quality/...). All models are loaded
once, then timed in interleaved rounds (greedy, ignore_eos, batch 1 and 8); the best round is reported,
because on a shared 2-core machine any other process stalls torch's two OpenMP threads for milliseconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qserve.config import resolve_model_path
from qserve.engine.llm import LLM
from qserve.types import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quality-dir", type=Path, default=Path("bench/out/quality"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = {"bf16": resolve_model_path("demo")}
    for name in ("int8", "int4-rtn-g128", "int4-awq-g128"):
        if (args.quality_dir / name / "config.json").is_file():
            paths[name] = args.quality_dir / name
    llms = {name: LLM(str(p), device="cpu", dtype="bfloat16") for name, p in paths.items()}
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    best: dict[str, dict[int, float]] = {name: {} for name in llms}
    for llm in llms.values():  # warm-up
        llm.generate(["import os\n"], SamplingParams(max_tokens=8, temperature=0.0))
    for _ in range(args.reps):
        for name, llm in llms.items():
            for batch in (1, 8):
                prompts = [f"def f{i}(x):\n" for i in range(batch)]
                t0 = time.perf_counter()
                llm.generate(prompts, params)
                rate = batch * args.tokens / (time.perf_counter() - t0)
                best[name][batch] = max(best[name].get(batch, 0.0), rate)
    print(
        f"threads {torch.get_num_threads()}, {args.tokens} tokens, best of {args.reps} interleaved rounds\n"
    )
    print("| model | decode tok/s batch 1 | vs bf16 | batch 8 | vs bf16 |")
    print("|---|---:|---:|---:|---:|")
    for name, r in best.items():
        b1, b8 = r[1], r[8]
        print(f"| {name} | {b1:.1f} | {b1 / best['bf16'][1]:.2f}x | {b8:.1f} | {b8 / best['bf16'][8]:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(best, indent=2))


if __name__ == "__main__":
    main()
