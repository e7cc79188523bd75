"""Quality and speed of quantized demo models: held-out perplexity and decode throughput.

    nice -n 10 .venv/bin/python bench/quant_quality.py [--max-tokens 65536] [--json FILE]
    PYTHONPATH=/tmp/bnb nice -n 10 .venv/bin/python bench/quant_quality.py   # + bitsandbytes peer rows

Converts the demo model to int8, int4-rtn g128 and int4-awq g128 (calibration: the demo's calib.txt),
then scores every variant on the first --max-tokens tokens of the demo's held-out text in non-overlapping
512-token windows (qserve.eval.perplexity: the first token of each window is unscored). bf16 is the
checkpoint run by qserve in bfloat16. If bitsandbytes imports, transformers + bitsandbytes nf4 / int8
(and transformers bf16, to show the two runtimes agree) are scored on exactly the same windows.
Decode throughput: greedy generation of --decode-tokens tokens at batch 1 and 8, ignore_eos.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from qserve.config import resolve_model_path
from qserve.converters import convert
from qserve.demo import CALIB_TEXT, HELDOUT_TEXT

CONTEXT = 512


def qserve_ppl(model: Path, text: str, max_tokens: int) -> dict[str, float]:
    from qserve.engine.llm import LLM
    from qserve.eval import perplexity

    res = perplexity(
        LLM(str(model), device="cpu", dtype="bfloat16"), text, context=CONTEXT, max_tokens=max_tokens
    )
    return {"perplexity": res.perplexity, "tokens": res.tokens, "tokens_per_second": res.tokens_per_second}


def decode_speed(model: Path, tokens: int) -> dict[str, float]:
    from qserve.engine.llm import LLM
    from qserve.types import SamplingParams

    llm = LLM(str(model), device="cpu", dtype="bfloat16")
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    llm.generate(["import os\n"], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
    out: dict[str, float] = {}
    for batch in (1, 8):
        prompts = [f"def f{i}(x):\n" for i in range(batch)]
        t0 = time.perf_counter()
        llm.generate(prompts, params)
        out[f"decode_tok_s_b{batch}"] = batch * tokens / (time.perf_counter() - t0)
    return out


def hf_ppl(model: Path, text: str, max_tokens: int, quant: str | None) -> dict[str, float]:
    """transformers (+ bitsandbytes) on CPU, on the same windows as qserve.eval.perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    elif quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    m = AutoModelForCausalLM.from_pretrained(str(model), device_map="cpu", **kwargs).eval()
    ids = AutoTokenizer.from_pretrained(str(model)).encode(text)[:max_tokens]
    windows = [ids[i : i + CONTEXT] for i in range(0, len(ids), CONTEXT)]
    nll, n, t0 = 0.0, 0, time.perf_counter()
    with torch.inference_mode():
        for w in (w for w in windows if len(w) >= 2):
            x = torch.tensor(w)[None]  # (1, T)
            logits = m(input_ids=x).logits[0, :-1].float()  # (T-1, V)
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            n += len(w) - 1
    return {"perplexity": math.exp(nll / n), "tokens": n, "tokens_per_second": n / (time.perf_counter() - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out/quality"))
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--model", default="demo", help="model directory (default: the demo model)")
    ap.add_argument("--heldout", type=Path, default=HELDOUT_TEXT)
    ap.add_argument("--calib", type=Path, default=CALIB_TEXT)
    args = ap.parse_args()
    demo, text = resolve_model_path(args.model), args.heldout.read_text()
    variants: dict[str, Path] = {"bf16": demo}
    for name, kw in {
        "int8": {"weights": "int8"},
        "int4-rtn g128": {"weights": "int4", "group_size": 128, "method": "rtn"},
        "int4-awq g128": {"weights": "int4", "group_size": 128, "method": "awq", "calib": args.calib},
    }.items():
        t0 = time.perf_counter()
        variants[name] = convert(demo, args.out / name.replace(" ", "-"), force=True, progress=False, **kw)  # type: ignore[arg-type]
        print(f"converted {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for name, path in variants.items():
        rows[name] = {"runtime": "qserve", **qserve_ppl(path, text, args.max_tokens)}
        report = path / "quant_report.json"
        if report.is_file():
            rows[name]["size_vs_bf16"] = json.loads(report.read_text())["summary"]["size_vs_bf16"]
        if name in ("bf16", "int4-rtn g128", "int4-awq g128", "int8"):
            rows[name] |= decode_speed(path, args.decode_tokens)
        print(name, json.dumps(rows[name]), flush=True)
    try:
        import bitsandbytes  # noqa: F401

        for name, quant in (("transformers bf16", None), ("bnb nf4", "nf4"), ("bnb int8", "int8")):
            try:
                rows[name] = {"runtime": "transformers", **hf_ppl(demo, text, args.max_tokens, quant)}
            except Exception as e:  # a peer that does not run on CPU is reported, not fatal
                rows[name] = {
                    "runtime": "transformers",
                    "error": f"{type(e).__name__}: {e}".splitlines()[0][:200],
                }
            print(name, json.dumps(rows[name]), flush=True)
    except ImportError:
        print("bitsandbytes not importable: peer rows skipped")
    base = rows["bf16"]["perplexity"]
    print(
        "\n| variant | runtime | perplexity | change vs bf16 | linear bytes vs bf16 | decode tok/s b1 | b8 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        if "perplexity" not in r:
            print(f"| {name} | {r['runtime']} | n/a: {r.get('error', '')} | | | | |")
            continue
        change = 100 * (r["perplexity"] / base - 1)
        size = f"{r['size_vs_bf16']:.3f}x" if "size_vs_bf16" in r else ""
        b1 = f"{r['decode_tok_s_b1']:.1f}" if "decode_tok_s_b1" in r else ""
        b8 = f"{r['decode_tok_s_b8']:.1f}" if "decode_tok_s_b8" in r else ""
        print(f"| {name} | {r['runtime']} | {r['perplexity']:.4f} | {change:+.2f}% | {size} | {b1} | {b8} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
