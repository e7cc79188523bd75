"""Demo-model perplexity on its held-out text with KV fp16 / int8 / int4, under bf16 and int4 weights.

    .venv/bin/python bench/kv_quality.py [--max-eval-tokens 131072] [--int4-dir bench/out/demo-int4-awq]

The int4-weight model is converted first if missing (qserve convert demo DIR --weights int4 --method awq).
Prints a markdown table (perplexity and change against bf16 weights + fp16 KV) for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def qserve(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "qserve.cli", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"qserve {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def main() -> None:
    from qserve.demo import HELDOUT_TEXT

    ap = argparse.ArgumentParser()
    ap.add_argument("--max-eval-tokens", type=int, default=131072)
    ap.add_argument("--int4-dir", default=str(ROOT / "bench/out/demo-int4-awq"))
    args = ap.parse_args()
    int4 = Path(args.int4_dir)
    if not (int4 / "config.json").is_file():
        qserve(
            "convert", "demo", str(int4), "--weights", "int4", "--method", "awq", "--no-progress", "--force"
        )
    rows = []
    for wname, model in (("bf16", "demo"), ("int4-awq g128", str(int4))):
        for kv in ("fp16", "int8", "int4"):
            t = time.perf_counter()
            res = json.loads(
                qserve(
                    "eval",
                    model,
                    "--data",
                    str(HELDOUT_TEXT),
                    "--kv-cache-dtype",
                    kv,
                    "--json",
                    "--max-eval-tokens",
                    str(args.max_eval_tokens),
                )
            )
            rows.append((wname, kv, res["perplexity"], res["tokens"], time.perf_counter() - t))
            print(rows[-1], flush=True)
    base = rows[0][2]
    print("\n| weights | KV cache | perplexity | change vs bf16 + fp16 KV | tokens scored |")
    print("|---|---|---:|---:|---:|")
    for w, kv, ppl, n, _ in rows:
        print(f"| {w} | {kv} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% | {n} |")


if __name__ == "__main__":
    main()
