"""Greedy agreement of quantized KV with floating-point KV on the demo model (issue 6's 95% bar).

    .venv/bin/python bench/kv_agreement.py [--model demo] [--prompts 64] [--max-tokens 64]

Prompts are held-out lines (longer than 20 characters, evenly spaced through qserve/demo/data/heldout.txt).
Per KV dtype and compute dtype it reports, against fp KV at the same compute dtype:

* free-run: greedy outputs generated independently, compared position by position (the issue's measure;
  one flipped near-tie changes every later token of that output),
* diverged: how many outputs differ anywhere, and the first differing position of each,
* near ties: at each first difference both engines saw the same tokens; how many of those differences have
  each engine's token in the other's top-5 (vLLM's check_logprobs_close), and the largest gap between the two
  tokens in the reference's logprobs,
* teacher-forced: the fp-KV greedy output fed back as a prompt, the share of its positions where the
  quantized-KV model's top-1 token is the same (llama.cpp's "same top p": per-token, no cascade).

The last rows are the noise floor: bf16 compute against fp32 compute, both with full-precision KV.
Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse

from qserve import LLM
from qserve.demo import heldout_prompts
from qserve.eval import greedy_agreement


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    prompts = heldout_prompts(args.prompts)
    rows = []
    fp32 = LLM(args.model, dtype="float32", kv_cache_dtype="fp32")
    bf16 = LLM(args.model, dtype="bfloat16", kv_cache_dtype="auto")
    for dtype, ref, fp_kv in (("float32", fp32, "fp32"), ("bfloat16", bf16, "auto")):
        for kv in ("int8", "int4"):
            a = greedy_agreement(
                ref, LLM(args.model, dtype=dtype, kv_cache_dtype=kv), prompts, args.max_tokens
            )
            rows.append((dtype, f"{kv} vs {fp_kv}", a))
            print(rows[-1], flush=True)
    rows.append(("bfloat16 vs float32", "fp vs fp", greedy_agreement(fp32, bf16, prompts, args.max_tokens)))
    print(f"\n{len(prompts)} prompts x {args.max_tokens} greedy tokens, model {args.model}\n")
    print(
        "| compute | KV cache | free-run match | outputs that diverge (first position) "
        "| of them in each other's top-5 | largest gap (nats) | teacher-forced top-1 |"
    )
    print("|---|---|---:|---|---:|---:|---:|")
    for dtype, kv, a in rows:
        first = a.diverged_at
        where = ", ".join(map(str, first[:12])) + (", ..." if len(first) > 12 else "")
        print(
            f"| {dtype} | {kv} | {100 * a.free_run:.1f}% | {len(first)}/{a.outputs} ({where}) "
            f"| {a.divergences_in_top_k}/{len(first)} | {max(a.divergence_gaps, default=0.0):.3f} "
            f"| {100 * a.teacher_forced:.2f}% |"
        )


if __name__ == "__main__":
    main()
