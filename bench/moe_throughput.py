"""MoE on CPU: offline throughput of a small random Mixtral (8 experts, top-2, ~95M parameters), bf16 vs int4.

    nice -n 10 .venv/bin/python bench/moe_throughput.py [--rounds 2] [--json FILE]

The model is built here from a config with random weights (nothing is downloaded) and saved in bf16; the
int4 variant is `qserve convert --weights int4 --group-size 128` (rtn) of it: attention and every expert
int4 on torch's CPU weight-only kernel, the router float. Both run in one process, alternated A B A B
(the machine is shared and noisy); each run generates --batch requests of --prompt-len random token ids with
--output-len greedy tokens (ignore_eos), plus a batch-1 decode run. Reported: output tokens/s (mean of the
rounds and best), and the batch-1 per-token latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent

OUT = Path(__file__).resolve().parent / "out"
CONFIG: dict[str, Any] = dict(
    architectures=["MixtralForCausalLM"],
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1536,  # per expert
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)


def build(path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **CONFIG), dtype=torch.bfloat16)
    model.save_pretrained(str(path))
    sys.path.insert(0, str(_HERE.parent))
    from tests.tiny_models import write_byte_tokenizer

    write_byte_tokenizer(path)
    return path


def run(llm: Any, prompts: list[list[int]], output_len: int) -> float:
    from qserve import SamplingParams

    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    elapsed = time.perf_counter() - t0
    assert all(len(o.token_ids) == output_len for o in outs)
    return sum(len(o.token_ids) for o in outs) / elapsed


def main() -> None:
    # (bench/kernels.py, since renamed kernel_timings.py, shadowed the `kernels` package transformers and bitsandbytes probe for: drop bench/
    # (sys.path[0] when run as a script) from the path before they are imported.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from qserve import LLM
    from qserve.converters import convert
    from qserve.presets import load_model_source

    bf16 = build(OUT / "mixtral-95m-bf16")
    int4 = OUT / "mixtral-95m-int4"
    if not (int4 / "config.json").is_file():
        convert(bf16, int4, weights="int4", group_size=128, progress=False)
    inv = load_model_source(str(bf16)).inventory
    print(f"params {inv.num_params / 1e6:.1f}M total, {inv.active_params / 1e6:.1f}M active per token")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    llms = {
        name: LLM(str(p), device="cpu", kv_cache_memory=256 << 20)
        for name, p in (("bf16", bf16), ("int4", int4))
    }
    for llm in llms.values():  # warm-up (first-call allocations, oneDNN primitive creation)
        run(llm, prompts[:2], 4)
    rows: dict[str, dict[str, list[float]]] = {n: {"batch": [], "b1": []} for n in llms}
    for r in range(args.rounds):
        for name, llm in llms.items():  # A B A B
            rows[name]["batch"].append(run(llm, prompts, args.output_len))
            rows[name]["b1"].append(run(llm, prompts[:1], args.output_len))
            print(
                f"round {r} {name}: batch {rows[name]['batch'][-1]:.1f} tok/s, b1 {rows[name]['b1'][-1]:.1f} tok/s",
                flush=True,
            )
    weights = {
        n: sum(load_model_source(str(p)).inventory.stored_bytes for p in [path])
        for n, path in (("bf16", bf16), ("int4", int4))
    }
    print(
        f"\n| weights | stored bytes | batch {args.batch} tok/s (mean, best) | batch 1 tok/s (mean, best) |"
    )
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        b, o = r["batch"], r["b1"]
        print(
            f"| {name} | {weights[name] / 1e6:.1f} MB | {sum(b) / len(b):.1f}, {max(b):.1f} | {sum(o) / len(o):.1f}, {max(o):.1f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"rows": rows, "weights_bytes": weights, "args": vars(args) | {"json": str(args.json)}},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
