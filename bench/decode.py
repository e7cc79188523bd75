"""End-to-end decode tok/s through qserve's engine on a random model of Llama-3-8B's shape.

    python bench/decode.py --out DIR [--budget-s 200]   # a CUDA GPU: weights x KV x batch x eager/graphs
    python bench/decode.py --dry-run --out DIR          # no GPU: the same sections on a tiny shape, on CPU

For weights bf16 / int8 / int4 (a random checkpoint written in qserve's format, then loaded by
``qserve.LLM`` like any model), KV cache bf16 / int8 / int4, batch 1 / 16 / 64, and eager vs CUDA graphs
(``enforce_eager=True`` / ``False``): prefill the batch, then time decode steps of the engine's public API
(``llm.engine.add_request`` / ``step``). Graphs are reported unavailable when the engine has no
``enforce_eager`` flag or reports no captured graphs (:func:`graphs_captured`).

Per point: decode tok/s (steps timed by CUDA events on GPU), device busy two ways (CUDA events around every
model forward, via torch forward hooks: forward span / wall; and the torch profiler's summed kernel time /
wall over a few steps), and the fraction of the HBM roofline: (weight bytes + KV bytes read per step) /
step time / peak bandwidth (the GPU's data-sheet figure; on CPU the measured copy bandwidth). The most
telling points run first (bf16 and int4 weights, bf16 KV, batch 1); whatever the budget leaves out is
listed as skipped. Writes DIR/decode.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, bench/ is on sys.path and a bench/kernels.py (since renamed) shadowed the `kernels` package that
# transformers probes for when it loads a tokenizer.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0)  # fmt: skip
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0)  # fmt: skip
BATCHES, MODES = (1, 16, 64), ("eager", "graphs")
# (weights, KV) in the order they run: the goals' points first, so a short budget still measures them, and
# grouped by weights, so at most two random checkpoints exist at once (each is deleted after its last use)
ORDER = [("bf16", "bf16"), ("int4", "bf16"), ("int4", "int8"), ("int4", "int4"), ("bf16", "int8"),
         ("bf16", "int4"), ("int8", "bf16"), ("int8", "int8"), ("int8", "int4")]  # fmt: skip
PEAK_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0,
             "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0, "A100": 1555.0, "L40S": 864.0}  # fmt: skip
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
GROUP = 128


# ----------------------------------------------------------------------------- the random checkpoint


def write_checkpoint(out: Path, shape: dict[str, Any], weights: str, device: str) -> None:
    """A random Llama checkpoint of ``shape``: bf16, or int4 (group 128) / int8 in qserve's format."""
    from safetensors.torch import save_file

    from qserve.config import resolve_model_path
    from qserve.kernels.packing import FORMAT_VERSION, quantize

    out.mkdir(parents=True, exist_ok=True)
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    dims = dict(
        zip(PROJECTIONS, [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)], strict=True)
    )
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*s: int) -> torch.Tensor:  # std 0.02, like HF's initializer
        return (torch.randn(*s, generator=g, device=device) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    for i in range(-1, layers):  # -1: embeddings, final norm, lm_head
        t: dict[str, torch.Tensor] = {}
        if i < 0:
            t["model.embed_tokens.weight"] = rand(shape["vocab_size"], h)
            t["lm_head.weight"] = rand(shape["vocab_size"], h)
            t["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=device)
        else:
            p = f"model.layers.{i}."
            t[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=device)
            t[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=device)
            for name, (n, k) in dims.items():
                w = rand(n, k)
                if weights == "bf16":
                    t[p + name + ".weight"] = w
                else:
                    for suffix, v in quantize(w, weights, GROUP).tensors().items():
                        t[f"{p}{name}.{suffix}"] = v
        file = f"model-{i + 2:05d}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in t.items()}, str(out / file))
        weight_map.update(dict.fromkeys(t, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config: dict[str, Any] = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", torch_dtype="bfloat16", head_dim=d,
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=256,
        bos_token_id=None, **shape,
    )  # fmt: skip
    if weights != "bf16":
        config["quantization_config"] = {
            "quant_method": "qserve", "format_version": FORMAT_VERSION, "weights": weights,
            "group_size": GROUP if weights == "int4" else -1, "method": "rtn", "zero_point": weights == "int4",
            "sym": weights == "int8", "modules_to_not_convert": ["lm_head"],
        }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=1))
    demo = resolve_model_path("demo")  # its tokenizer: ids past its vocabulary decode to nothing
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (demo / f).is_file():
            shutil.copy(demo / f, out / f)


# ----------------------------------------------------------------------------- measuring


def graphs_captured(llm: Any) -> bool:
    """Whether the engine says it captured CUDA graphs: a non-empty ``graphs`` / ``cuda_graphs`` on the
    engine or its runner, or a truthy ``*graph*`` metric."""
    for owner in (llm.engine, getattr(llm.engine, "runner", None)):
        for attr in ("graphs", "cuda_graphs"):
            if getattr(owner, attr, None):
                return True
    return any(
        "graph" in k and bool(v) for k, v in llm.metrics().items() if isinstance(v, (int, float, bool))
    )


def model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of every weight tensor the model holds, bytes of the embedding table), each tensor once."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        tensors = [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
        tensors += [v for v in vars(mod).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            try:
                key = t.data_ptr()
            except RuntimeError:  # a storage-less tensor (torch's packed CPU int4 weights)
                key = id(t)
            seen[key] = t.numel() * t.element_size()
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    emb_bytes = sum(p.numel() * p.element_size() for p in emb.parameters()) if emb is not None else 0
    return sum(seen.values()), emb_bytes


class ForwardEvents:
    """CUDA events around every forward of ``model`` (torch hooks; the engine is not touched)."""

    def __init__(self, model: torch.nn.Module, on: bool) -> None:
        self.pairs: list[tuple[Any, Any]] = []
        self.on = on and torch.cuda.is_available()
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        if self.on:
            self.pairs.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.pairs[-1][0].record()

    def _post(self, *_: Any) -> None:
        if self.on and self.pairs:
            self.pairs[-1][1].record()

    def busy_seconds(self) -> float:
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.pairs) / 1e3

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def kernel_seconds(prof: Any, cuda: bool) -> float:
    """Device time covered by kernels (and copies) in a profile: the union of their intervals. On CPU, the
    plumbing's stand-in: the summed self time of aten ops."""
    if not cuda:
        return sum(e.self_cpu_time_total for e in prof.events() if e.name.startswith("aten::")) / 1e6
    spans = sorted(
        (e.time_range.start, e.time_range.end) for e in prof.events() if str(e.device_type).endswith("CUDA")
    )
    total, reach = 0.0, float("-inf")
    for start, end in spans:  # microseconds; merge overlaps (several streams)
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e6


def measure(llm: Any, batch: int, prompt_len: int, steps: int, prof_steps: int, cuda: bool) -> dict[str, Any]:
    """Prefill ``batch`` random prompts, then time ``steps`` decode steps (and profile ``prof_steps``)."""
    from qserve.types import SamplingParams

    eng = llm.engine
    vocab = eng.model_config.vocab_size
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=steps + prof_steps + 2, temperature=0.0, ignore_eos=True)
    made: dict[str, int] = {}  # request id -> tokens generated so far (from the step outputs)
    for i in range(batch):
        ids = torch.randint(300, vocab, (prompt_len,), generator=g).tolist()
        made[f"b{batch}-{i}"] = 0
        eng.add_request(f"b{batch}-{i}", None, params, prompt_token_ids=ids)

    def step() -> None:
        for o in eng.step():
            made[o.request_id] = len(o.token_ids)

    while min(made.values()) == 0:  # prefill (chunked if the batch is over the token budget)
        step()
    step()  # a first decode step at this batch size (autotuning, graph warm-up)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    events = ForwardEvents(eng.model, cuda)
    sync()
    ctx = batch * prompt_len + sum(made.values())
    start = torch.cuda.Event(enable_timing=True) if cuda else None
    end = torch.cuda.Event(enable_timing=True) if cuda else None
    t0 = time.perf_counter()
    if start is not None:
        start.record()
    for _ in range(steps):
        step()
    if end is not None:
        end.record()
    sync()
    wall = time.perf_counter() - t0
    span = start.elapsed_time(end) / 1e3 if start is not None and end is not None else wall
    busy_events = events.busy_seconds() / wall if events.on and events.pairs else None
    events.close()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        t1 = time.perf_counter()
        for _ in range(prof_steps):
            step()
        sync()
        prof_wall = time.perf_counter() - t1
    busy_prof = kernel_seconds(prof, cuda) / prof_wall
    for rid in made:
        eng.abort_request(rid)
    ctx_mid = ctx + batch * steps // 2  # tokens in the cache at the middle of the timed steps
    return dict(step_s=span / steps, tok_s=batch * steps / span, busy_events=busy_events,
                busy_profiler=min(busy_prof, 1.0), context_tokens=ctx_mid / batch)  # fmt: skip


def scratch_dir(shape: dict[str, Any], cuda: bool) -> Path:
    """/dev/shm when it holds two bf16 checkpoints of ``shape`` (containers often give it 64 MB), else $TMPDIR."""
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    params = 2 * shape["vocab_size"] * h + layers * (
        2 * h * h + 2 * kv * h + 3 * h * shape["intermediate_size"]
    )
    shm = Path("/dev/shm")
    if cuda and shm.is_dir() and shutil.disk_usage(shm).free > 2 * 2 * params * 1.1:
        return shm
    return Path(tempfile.gettempdir())


def peak_bandwidth(cuda: bool) -> tuple[float, str]:
    """(GB/s, where it comes from): the data sheet by GPU name; on CPU a measured 64 MiB copy."""
    if os.environ.get("DECODE_PEAK_GBPS"):
        return float(os.environ["DECODE_PEAK_GBPS"]), "DECODE_PEAK_GBPS"
    if cuda:
        name = torch.cuda.get_device_name(0)
        for key, gbps in PEAK_GBPS.items():
            if key in name:
                return gbps, f"data sheet ({name})"
        return 0.0, f"unknown GPU {name!r}: set DECODE_PEAK_GBPS"
    src = torch.empty(2**26, dtype=torch.uint8)
    dst = torch.empty_like(src)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 2 * 5 * src.numel() / (time.perf_counter() - t0) / 1e9, "measured CPU copy (read + write)"


# ----------------------------------------------------------------------------- the sweep


def make_llm(path: Path, kv: str, mode: str, cuda: bool, max_len: int) -> tuple[Any, str | None]:
    """(LLM, None), or (None, why graphs are unavailable) for a graphs point the engine cannot serve."""
    from qserve import LLM
    from qserve.config import EngineConfig

    kw: dict[str, Any] = dict(device="cuda" if cuda else "cpu", dtype="bfloat16", kv_cache_dtype=kv,
                              max_num_seqs=max(BATCHES), max_model_len=max_len,
                              kv_cache_memory=(4 << 30) if cuda else (64 << 20))  # fmt: skip
    has_flag = "enforce_eager" in EngineConfig.__dataclass_fields__
    if mode == "graphs" and not cuda:
        return None, "no CUDA device"
    if mode == "graphs" and not has_flag:
        return None, "the engine has no enforce_eager flag"
    if has_flag:
        kw["enforce_eager"] = mode == "eager"
    llm = LLM(str(path), **kw)
    if mode == "graphs" and not graphs_captured(llm):
        return None, "the engine reports no captured CUDA graphs"
    return llm, None


def row_line(r: dict[str, Any]) -> str:
    ev = "-" if r["busy_events"] is None else f"{100 * r['busy_events']:.0f}%"
    roof = "-" if r["roofline"] is None else f"{100 * r['roofline']:.0f}%"
    return (f"  weights {r['weights']:4s} KV {r['kv']:4s} {r['mode']:6s} batch {r['batch']:3d}: "
            f"{r['tok_s']:9.1f} tok/s, step {1e3 * r['step_s']:7.2f} ms, busy: events {ev}, "
            f"profiler {100 * r['busy_profiler']:.0f}%; roofline {roof}")  # fmt: skip


def free() -> None:
    """Return the memory of engines no longer referenced (call after dropping the last reference)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's decode goals, from the measured rows (None where a point is missing)."""

    def get(w: str, kv: str, b: int, mode: str) -> dict[str, Any] | None:
        hits = [
            r
            for r in rows
            if (r["weights"], r["kv"], r["batch"], r["mode"]) == (w, kv, b, mode) and "tok_s" in r
        ]
        return hits[0] if hits else None

    def best(w: str, kv: str, b: int) -> dict[str, Any] | None:
        cands = [r for m in MODES if (r := get(w, kv, b, m))]
        return max(cands, key=lambda r: r["tok_s"]) if cands else None

    out = []
    busy = [r["busy_profiler"] for r in rows if "tok_s" in r and r["batch"] >= 16 and r["mode"] == "graphs"]
    busy = busy or [r["busy_profiler"] for r in rows if "tok_s" in r and r["batch"] >= 16]
    out.append(
        dict(goal="device busy (profiler) >= 90% at batch >= 16", want=0.9, got=min(busy) if busy else None)
    )
    e, gr = get("bf16", "bf16", 1, "eager"), get("bf16", "bf16", 1, "graphs")
    out.append(dict(goal="graphs >= 1.5x eager tok/s at batch 1", want=1.5,
                    got=gr["tok_s"] / e["tok_s"] if e and gr else None))  # fmt: skip
    b16, i4 = best("bf16", "bf16", 1), best("int4", "bf16", 1)
    out.append(dict(goal="int4 >= 1.9x bf16 decode at batch 1", want=1.9,
                    got=i4["tok_s"] / b16["tok_s"] if b16 and i4 else None))  # fmt: skip
    roof = [r["roofline"] for r in rows if "tok_s" in r and r["batch"] == 1 and r.get("roofline") is not None]
    out.append(dict(goal=">= 70% of the HBM roofline at batch 1", want=0.7, got=max(roof) if roof else None))
    for g in out:
        g["ok"] = None if g["got"] is None else bool(g["got"] >= g["want"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--budget-s", type=float, default=200.0, help="start no new point after this long")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: a tiny shape on CPU (checks the script)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per point")
    ap.add_argument("--scratch", type=Path, default=None, help="where the random checkpoints go")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("bench/decode.py needs a CUDA GPU (or --dry-run)", file=sys.stderr)
        return 2
    t_start = time.time()
    shape = LLAMA3_8B if cuda else TINY
    steps, prof_steps, prompt_len = args.steps or (32 if cuda else 2), 4 if cuda else 1, 128 if cuda else 16
    max_len = prompt_len + steps + prof_steps + 8
    peak, peak_src = peak_bandwidth(cuda)
    env = dict(device=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__,
               shape=shape, peak_gbps=peak, peak_source=peak_src, steps=steps, prompt_len=prompt_len)  # fmt: skip
    print(f"== decode bench: {json.dumps(env)}", flush=True)
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"env": env, "rows": rows}
    base = args.scratch or scratch_dir(shape, cuda)
    scratch = Path(tempfile.mkdtemp(prefix="qserve-decode-", dir=base))
    written: dict[str, Path] = {}
    try:
        for weights, kv in ORDER:
            for mode in MODES:
                point = dict(weights=weights, kv=kv, mode=mode)
                if time.time() - t_start > args.budget_s:
                    rows += [dict(point, batch=b, skipped="out of budget") for b in BATCHES]
                    continue
                if weights not in written:
                    t0 = time.time()
                    written[weights] = scratch / weights
                    write_checkpoint(written[weights], shape, weights, "cuda" if cuda else "cpu")
                    print(f"  {weights} checkpoint written in {time.time() - t0:.0f} s", flush=True)
                t0 = time.time()
                llm, why = make_llm(written[weights], kv, mode, cuda, max_len)
                if llm is None:
                    free()  # an engine built to ask for graphs may have just been dropped
                    rows += [dict(point, batch=b, unavailable=why) for b in BATCHES]
                    print(f"  weights {weights} KV {kv} {mode}: unavailable ({why})", flush=True)
                    continue
                wbytes, emb = model_bytes(llm.engine.model)
                per_token = llm.engine.kv_spec.bytes_per_block / llm.engine.kv_spec.block_size
                point["load_s"] = time.time() - t0
                for b in BATCHES:
                    r = dict(point, batch=b, **measure(llm, b, prompt_len, steps, prof_steps, cuda))
                    # bytes read per step: every weight but the embedding table (rows gathered), plus the
                    # whole KV context of every sequence
                    r["bytes_per_step"] = moved = wbytes - emb + b * r["context_tokens"] * per_token
                    r["roofline"] = moved / r["step_s"] / (peak * 1e9) if peak else None
                    rows.append(r)
                    print(row_line(r), flush=True)
                llm = None  # the engine's weights and KV pool go before the next one is built
                free()
            if all(w != weights for w, _ in ORDER[ORDER.index((weights, kv)) + 1 :]):
                shutil.rmtree(written.pop(weights, scratch / "none"), ignore_errors=True)  # last use
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result["goals"] = goals(rows)
    result["elapsed_s"] = time.time() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps(result, indent=1))
    for g in result["goals"]:
        got = "-" if g["got"] is None else f"{g['got']:.2f}"
        print(f"  goal {g['goal']}: {got} {'PASS' if g['ok'] else 'n/a' if g['ok'] is None else 'FAIL'}")
    print(f"  wrote {args.out / 'decode.json'} [{result['elapsed_s']:.0f} s]", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
