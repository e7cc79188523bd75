"""nf4 quality on the demo model: qserve (`qserve convert --weights nf4`, bitsandbytes' kernels in qserve's
runtime) against transformers + bitsandbytes nf4, held-out perplexity on the same windows.

    nice -n 10 .venv/bin/python bench/bnb_quality.py [--max-tokens 65536] [--json FILE]

Both compute in bfloat16 (bnb_4bit_compute_dtype bf16), blocksize 64, no double quantization; the bf16 rows
(qserve and transformers on the unquantized demo model) show how far the two runtimes differ without bnb.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from qserve.config import resolve_model_path
from qserve.converters import convert
from qserve.demo import HELDOUT_TEXT

_HERE = Path(__file__).resolve().parent


def _quant_quality():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("quant_quality", _HERE / "quant_quality.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    # (bench/kernels.py, since renamed kernel_timings.py, shadowed the `kernels` package transformers and bitsandbytes probe for: drop bench/
    # (sys.path[0] when run as a script) from the path before they are imported.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    qq = _quant_quality()
    CONTEXT, hf_ppl, qserve_ppl = qq.CONTEXT, qq.hf_ppl, qq.qserve_ppl  # noqa: N806
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out/bnb"))
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    demo, text = resolve_model_path("demo"), HELDOUT_TEXT.read_text()
    t0 = time.perf_counter()
    nf4 = convert(demo, args.out / "nf4", weights="nf4", force=True, progress=False)
    print(f"converted nf4 in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = {
        "bf16 qserve": qserve_ppl(demo, text, args.max_tokens),
        "bf16 transformers": hf_ppl(demo, text, args.max_tokens, None),
        "nf4 qserve": qserve_ppl(nf4, text, args.max_tokens),
        "nf4 transformers+bnb": hf_ppl(demo, text, args.max_tokens, "nf4"),
    }
    for name, r in rows.items():
        print(name, json.dumps(r), flush=True)
    gap = rows["nf4 qserve"]["perplexity"] / rows["nf4 transformers+bnb"]["perplexity"] - 1
    print(f"\nwindows of {CONTEXT} tokens; nf4 qserve vs transformers+bnb: {100 * gap:+.3f}%")
    print("| variant | runtime | perplexity | tokens | tokens/s |\n|---|---|---:|---:|---:|")
    for name, r in rows.items():
        v, rt = name.split(" ", 1)
        print(f"| {v} | {rt} | {r['perplexity']:.4f} | {r['tokens']} | {r['tokens_per_second']:,.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "nf4_gap": gap}, indent=2))


if __name__ == "__main__":
    main()
