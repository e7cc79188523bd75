"""Peak RSS of `qserve convert` against model size, on a synthetic ~3B-parameter Llama checkpoint.

    nice -n 10 .venv/bin/python bench/convert_memory.py [--dir bench/out/convert_memory] [--keep]

Writes a random bf16 checkpoint (hidden 3072, 28 layers, GQA 24/8 heads, MLP 8192, vocab 32000:
3.0B parameters, ~6 GB, 2 GiB shards) tensor by tensor, then converts it in a fresh subprocess per
setting and reads that process's peak RSS (ru_maxrss). Streaming means the peak should track the largest
tensors (embedding 197 MB, MLP 50 MB in bf16), not the 6 GB model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, d = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    return [*shapes, ("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]


def write_synthetic(path: Path, layers: int = 28) -> int:
    """Stream a random bf16 checkpoint with ``layers`` layers to ``path``; returns its parameter count."""
    from qserve.converters.stream import OutputTensor, ShardedWriter

    path.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG, "num_hidden_layers": layers}
    shapes = tensor_shapes(config)
    writer = ShardedWriter(
        path, [OutputTensor(n, torch.bfloat16, s) for n, s in shapes], max_shard_bytes=2 << 30
    )
    gen = torch.Generator().manual_seed(0)
    for name, shape in shapes:
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        writer.write(name, t.to(torch.bfloat16))
    writer.close()
    (path / "config.json").write_text(json.dumps(config, indent=2))
    n = 0
    for _, s in shapes:
        n += int(torch.tensor(s).prod())
    return n


_HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"


def run_convert(src: Path, out: Path, weights: str) -> dict:
    """Convert in a fresh process; its peak RSS is VmHWM (ru_maxrss would inherit this process's peak)."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "from qserve.converters import convert\n"
        f"convert({str(src)!r}, {str(out)!r}, weights={weights!r}, force=True, progress=False)\n"
        f"print(time.perf_counter() - t0, {_HWM})\n"
    )
    base = f"import torch, safetensors, qserve.converters; print(0, {_HWM})"
    baseline_kib = int(
        subprocess.run(
            [sys.executable, "-c", base], capture_output=True, text=True, check=True
        ).stdout.split()[-1]
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, peak_kib = res.stdout.split()[-2:]
    out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {
        "weights": weights,
        "seconds": round(float(seconds), 1),
        "peak_rss_mib": round(int(peak_kib) / 1024, 1),
        "import_baseline_rss_mib": round(baseline_kib / 1024, 1),
        "output_gib": round(out_bytes / 2**30, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("bench/out/convert_memory"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and outputs")
    ap.add_argument("--layers", type=int, default=28, help="28: 3.0B parameters; 14: 1.6B")
    ap.add_argument("--weights", nargs="+", default=["int4", "int8"])
    args = ap.parse_args()
    config = {**CONFIG, "num_hidden_layers": args.layers}
    src = args.dir / ("synthetic-3b" if args.layers == 28 else f"synthetic-{args.layers}L")
    t0 = time.perf_counter()
    if not (src / "config.json").is_file():
        script = (
            f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import convert_memory as m; "
        )
        subprocess.run(
            [sys.executable, "-c", script + f"m.write_synthetic(m.Path({str(src)!r}), {args.layers})"],
            check=True,
        )
    params = sum(int(torch.tensor(s).prod()) for _, s in tensor_shapes(config))
    model_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    largest = max(int(torch.tensor(s).prod()) * 2 for _, s in tensor_shapes(config))
    print(
        f"synthetic checkpoint: {params / 1e9:.2f}B params, {model_bytes / 2**30:.2f} GiB "
        f"({time.perf_counter() - t0:.0f} s); largest tensor {largest / 2**20:.0f} MiB",
        flush=True,
    )
    rows = []
    for weights in args.weights:
        row = run_convert(src, args.dir / f"out-{args.layers}L-{weights}", weights)
        row["model_gib"] = round(model_bytes / 2**30, 2)
        row["peak_rss_over_model"] = round(row["peak_rss_mib"] * 2**20 / model_bytes, 3)
        row["largest_tensor_mib"] = round(largest / 2**20, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
