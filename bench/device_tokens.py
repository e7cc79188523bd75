"""Device tokens on CPU (issue 17): the cost of the on-device scatter and the async look-ahead, A B A B.

Four engine configurations over one greedy decode workload (the demo model unless ``--model``): the host
path and device tokens, each synchronous and with async scheduling (where device tokens launch the next
step before the last one's ids reach the host). Engines are built once; the rounds alternate A B A B, and
every configuration's output must match the first's token for token (float32). On CPU the forward is
synchronous, so the look-ahead can only move the apply step off the critical path; the point of device
tokens is a GPU, where it removes the host round trip per step (bench/gpu.sh measures it there).

Usage::

    flock /tmp/qserve-bench.lock .venv/bin/python bench/device_tokens.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from qserve import LLM, SamplingParams

CONFIGS = (("host", False, False), ("device", True, False), ("host+async", False, True),
           ("device+async", True, True))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (args.prompt_len,), generator=g).tolist() for _ in range(args.seqs)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engines = {}
    for name, device, overlap in CONFIGS:
        llm = LLM(
            args.model,
            dtype="float32",
            enforce_eager=True,
            async_scheduling=overlap,
            kv_cache_memory="256MiB",
        )
        llm.engine.runner.device_tokens = device
        llm.generate(prompt_token_ids=prompts[:2], sampling_params=params)  # warm-up
        engines[name] = llm
    times: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
    want = None
    for _ in range(args.rounds):
        for name, llm in engines.items():
            t0 = time.perf_counter()
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
            times[name].append(time.perf_counter() - t0)
            ids = [o.token_ids for o in outs]
            want = want or ids
            assert ids == want, f"{name}: output differs from the host path"
    tokens = args.seqs * args.max_tokens
    best = {name: tokens / min(ts) for name, ts in times.items()}
    print(json.dumps({"tokens_per_second": {k: round(v, 1) for k, v in best.items()},
                      "device_over_host": round(best["device"] / best["host"], 3),
                      "device_async_over_host_async": round(best["device+async"] / best["host+async"], 3),
                      "per_round_seconds": {k: [round(t, 3) for t in ts] for k, ts in times.items()},
                      "look_ahead_steps": engines["device+async"].engine.steps_ahead,
                      "rounds": args.rounds}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
