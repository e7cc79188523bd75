"""`qserve plan`: byte formulas against hand-computed values, the engine allocating exactly the plan, the CLI."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qserve.cache.kv_cache import KVCacheSpec
from qserve.cli import app
from qserve.config import EngineConfig, ModelConfig
from qserve.engine.llm import LLM
from qserve.errors import QServeError
from qserve.planner import (
    GPU_RESERVE_BYTES,
    engine_kv_blocks,
    kv_spec_for,
    plan,
    plan_engine,
    save_plot,
)
from qserve.presets import (
    find_gpu,
    find_model_preset,
    load_model_source,
    model_preset_names,
    read_safetensors_header,
)

GIB = 1 << 30
# Llama-3.1-8B by hand: 32 layers of q/o 4096x4096, k/v 1024x4096, gate/up/down 14336x4096 (+ 2 norms),
# embeddings and lm_head 128256x4096, final norm 4096.
L8_LINEAR = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)  # 6_979_321_856
L8_ROWS = 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096)  # output channels (int8 scales)
L8_FLOAT = 2 * 128256 * 4096 + 32 * 2 * 4096 + 4096  # embed + lm_head + norms


def test_kv_bytes_per_token_llama_8b() -> None:
    cfg = load_model_source("llama-3.1-8b").config
    per = {kv: kv_spec_for(cfg, "bf16", kv, 16).bytes_per_token for kv in ("fp16", "bf16", "int8", "int4")}
    assert per == {
        "fp16": 131072,  # 2 (K, V) x 32 layers x 8 KV heads x 128 x 2 B
        "bf16": 131072,
        "int8": 2 * 32 * 8 * (128 + 4),  # + fp16 scale and zero per token per head
        "int4": 2 * 32 * 8 * (64 + 4),
    }
    spec = kv_spec_for(cfg, "bf16", "auto", 16)
    assert isinstance(spec, KVCacheSpec) and spec.dtype == "bf16" and spec.bytes_per_block == 16 * 131072


def test_weight_bytes_llama_8b() -> None:
    got = {w: plan("llama-3.1-8b", memory=1 << 40, weights=w).weights_bytes for w in ("bf16", "int8", "int4")}
    assert got["bf16"] == 2 * (L8_LINEAR + L8_FLOAT) == 16_060_522_496  # ~16.06e9
    assert got["int8"] == L8_LINEAR + 2 * L8_ROWS + 2 * L8_FLOAT == 9_083_953_152
    assert got["int4"] == L8_LINEAR // 2 + 3 * (L8_LINEAR // 128) + 2 * L8_FLOAT == 5_755_117_568
    assert plan("meta-llama/Llama-3.1-8B", memory=1 << 40).weights == "bf16"  # auto = as published


def test_llama_70b_int4_on_h200() -> None:
    p = plan("Llama-3.1-70B", gpu="h200", weights="int4", kv_cache_dtype="fp16")
    linear = 80 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192)
    weights = linear // 2 + 3 * (linear // 128) + 2 * (2 * 128256 * 8192 + 80 * 2 * 8192 + 8192)
    assert p.weights_bytes == weights == 40_035_172_352
    assert p.memory_bytes == 143771 << 20
    act = 2048 * (2 * 8192 + 3 * 28672) * 2 + 256 * 128256 * 4 * 2
    assert p.activation_bytes == act
    free = p.memory_bytes - GPU_RESERVE_BYTES - weights
    assert p.reserve_bytes == GPU_RESERVE_BYTES + free - int(free * 0.9)
    assert p.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2
    # step buffers: 2048 token rows x 3 int64, 256 seqs x (lengths, offsets (+1), 256-block tables) int32,
    # each with one spare row; 256 int64 token sources and logits rows
    buffers = 2049 * 3 * 8 + 4 * (257 + 258 + 257 * 256) + 2 * 256 * 8
    assert p.step_buffer_bytes == buffers == 318_500
    # graph pool, bucket 256 (bf16): MLP rows 3 x 8192 + 4 x 28672 beat attention's; no decode split (256
    # seqs x 8 KV heads fill 132 SMs), no split-K; outputs of the 40 buckets (sum 4231 rows); 2 MiB
    # segments, plus one 20 MiB segment for the 4 MiB (256, 8192) tensors
    pool = 256 * 2 * (3 * 8192 + 4 * 28672) + 4231 * 8192 * 2
    pool = -(-pool // (2 << 20)) * (2 << 20) + (20 << 20)
    assert p.cuda_graph_pool_bytes == pool == 163_577_856
    assert p.kv_num_blocks == (int(free * 0.9) - act - buffers - pool) // (16 * 327680) == 18660
    assert p.kv_capacity_tokens == 18660 * 16
    assert p.max_concurrent_sequences == p.max_num_seqs == 18660 * 16 // 4096 == 72
    assert p.decode is not None and p.decode.batch == 72 and p.decode.bound == "memory"
    eager = plan("Llama-3.1-70B", gpu="h200", weights="int4", kv_cache_dtype="fp16", enforce_eager=True)
    assert eager.cuda_graph_pool_bytes == 0 and eager.step_buffer_bytes == buffers
    assert eager.kv_num_blocks == (int(free * 0.9) - act - buffers) // (16 * 327680)


def test_engine_on_cuda_sizes_like_the_gpu_plan() -> None:
    """The engine's CUDA sizing (free memory after the weights) gives the plan's blocks when the CUDA
    context takes exactly the reserve."""
    p = plan("qwen3-8b", gpu="H100-80GB", weights="int4", kv_cache_dtype="int8")
    src = load_model_source("qwen3-8b")
    spec = kv_spec_for(src.config, "int4", "int8", 16)
    free = p.memory_bytes - GPU_RESERVE_BYTES - p.weights_bytes
    graphs = EngineConfig(model="", enforce_eager=False)  # (the tests run eager by default)
    blocks = engine_kv_blocks(spec, src.config, graphs, 4096, 2, free, 4 * GIB, "int4")
    assert blocks == p.kv_num_blocks and p.cuda_graph_pool_bytes > 0 and p.step_buffer_bytes > 0
    # the same with other step sizes, eager, and a longer max_model_len (wider block tables)
    # (the plan fills the memory with KV: the engine does when max_num_seqs x max_model_len needs more)
    for seqs, tokens, eager, mlen in (
        (64, 512, False, 16384),
        (256, 8192, True, 4096),
        (256, 2048, False, 40960),
    ):
        q = plan("qwen3-8b", gpu="H100-80GB", weights="int4", kv_cache_dtype="int8", max_num_seqs=seqs,
                 max_num_batched_tokens=tokens, max_model_len=mlen, enforce_eager=eager)  # fmt: skip
        config = EngineConfig(model="", max_num_seqs=seqs, max_num_batched_tokens=tokens, enforce_eager=eager)
        assert (q.cuda_graph_pool_bytes == 0) == eager
        free = q.memory_bytes - GPU_RESERVE_BYTES - q.weights_bytes
        assert engine_kv_blocks(spec, src.config, config, mlen, 2, free, 4 * GIB, "int4") == q.kv_num_blocks


def test_cpu_budget_plan_is_what_the_engine_allocates(tiny_llama: Path) -> None:
    cfg = ModelConfig.from_pretrained(tiny_llama)
    weights = sum(int(t["data_offsets"][1] - t["data_offsets"][0]) for t in _header(tiny_llama).values())
    # the step buffers of 2048 token rows, 256 sequences, 512 / 16 blocks each: 3 x 8 B per token row,
    # 4 B x (lengths, offsets, 32 block ids) + 8 B token source and logits row per sequence, one more offset,
    # and one spare token row and sequence row
    buffers = 2049 * 24 + 257 * 4 * (2 + 32) + 4 + 256 * 16
    budget = weights + 4_849_664 + buffers + 37 * 8192 + 100  # + activations, buffers, 37 fp32 blocks, change
    p = plan(str(tiny_llama), memory=budget)
    assert p.step_buffer_bytes == buffers and p.cuda_graph_pool_bytes == 0  # a CPU budget: no graphs
    assert (p.weights, p.kv_cache_dtype, p.weights_bytes, p.reserve_bytes) == ("fp32", "fp32", weights, 0)
    assert p.kv_bytes_per_token == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 == 512
    assert (p.kv_num_blocks, p.kv_capacity_tokens) == (37, 37 * 16)
    llm = LLM(str(tiny_llama), kv_cache_memory=p.kv_cache_bytes)
    assert llm.engine.kv.capacity_tokens == p.kv_capacity_tokens
    assert llm.engine.runner.buffers.nbytes == p.step_buffer_bytes  # what the engine really allocated
    params = {id(t): t.numel() * t.element_size() for t in llm.engine.model.parameters()}
    assert sum(params.values()) == p.weights_bytes
    # the serve hook: --memory-budget with --dtype recasting the float checkpoint, sequences of max_model_len
    q = plan_engine(str(tiny_llama), budget, dtype="bfloat16", max_model_len=100)
    assert (q.weights, q.weights_bytes, q.context) == ("bf16", weights // 2, 100)
    assert q.max_num_seqs == q.kv_capacity_tokens // 112 and q.kv_cache_dtype == "bf16"


def test_quantized_directories_count_their_bytes(tiny_llama: Path, tmp_path: Path) -> None:
    from qserve.converters.convert import convert
    from tests.converters.fixtures import write_quantized_checkpoint

    out = convert(tiny_llama, tmp_path / "q4", weights="int4", group_size=32, progress=False)
    stored = sum(t["data_offsets"][1] - t["data_offsets"][0] for t in _header(out).values())
    as_float = plan(str(tiny_llama), memory=GIB, weights="bf16").weights_bytes
    assert plan(str(out), memory=GIB).weights_bytes == stored  # the real packed bytes
    assert plan(str(out), memory=GIB).weights == "int4"
    assert plan(str(out), memory=GIB, weights="bf16").weights_bytes == as_float  # shapes recovered
    for kind in ("awq", "gptq"):
        d = tmp_path / kind
        write_quantized_checkpoint(tiny_llama, d, kind, 32)
        assert plan(str(d), memory=GIB, weights="bf16").weights_bytes == as_float


def test_header_only_is_read(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F16", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header)  # no data at all
    assert read_safetensors_header(f)["w"]["shape"] == [4, 4]
    f.write_bytes(b"\x01")
    with pytest.raises(QServeError, match="not a safetensors file"):
        read_safetensors_header(f)


def test_preset_names() -> None:
    names = {
        "meta-llama/Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
        "LLAMA-3.1-8B": "meta-llama/Llama-3.1-8B",
        "meta-llama/Llama-3.1-8B-Instruct": "meta-llama/Llama-3.1-8B",
        "mistral-7b": "mistralai/Mistral-7B-v0.3",
        "mistralai/Mistral-7B-Instruct-v0.3": "mistralai/Mistral-7B-v0.3",
        "Qwen/Qwen2.5-7B-Instruct": "Qwen/Qwen2.5-7B",
    }
    for name, hub in names.items():
        found = find_model_preset(name)
        assert found is not None and found[0] == hub, name
    assert find_gpu("h100").name == "H100-80GB" and find_gpu("H200").bandwidth == 4.8e12
    billions = {n: load_model_source(n).inventory.num_params / 1e9 for n in model_preset_names()}
    published = {"llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "llama-3.1-70b": 70.55, "mistral-7b-v0.3": 7.25}
    published |= {"qwen2.5-7b": 7.62, "qwen2.5-72b": 72.71, "qwen3-8b": 8.19, "qwen3-32b": 32.76}
    for name, b in published.items():
        assert abs(billions[name] - b) < 0.01, (name, billions[name])


JSON_KEYS = {
    "model", "source", "gpu", "memory_bytes", "weights", "kv_cache_dtype", "context", "block_size",
    "requested_max_num_seqs", "price_per_hour", "weights_bytes", "expert_weights_bytes",
    "active_expert_weights_bytes", "activation_bytes", "step_buffer_bytes", "cuda_graph_pool_bytes",
    "reserve_bytes", "kv_cache_bytes", "kv_bytes_per_token", "kv_bytes_per_block", "kv_num_blocks", "kv_capacity_tokens",
    "max_concurrent_sequences", "max_num_seqs", "max_num_batched_tokens", "decode", "comparison",
}  # fmt: skip
ROW_KEYS = {
    "weights", "kv_cache_dtype", "weights_bytes", "kv_bytes_per_token", "kv_capacity_tokens",
    "max_concurrent_sequences", "decode_tokens_per_second",
}  # fmt: skip
DECODE_KEYS = {"batch", "context", "step_seconds", "tokens_per_second", "bound", "cost_per_million_tokens"}


def test_json_keys_are_stable() -> None:
    args = ["plan", "llama-3.1-8b", "--gpu", "H200", "--weights", "int4", "--kv-cache-dtype", "int8"]
    r = CliRunner().invoke(app, [*args, "--json", "--price-per-hour", "3.5", "--context", "8192"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == JSON_KEYS and set(out["decode"]) == DECODE_KEYS
    assert [(c["weights"], c["kv_cache_dtype"]) for c in out["comparison"]] == [
        (w, kv) for w in ("bf16", "int8", "int4") for kv in ("fp16", "int8", "int4")
    ]
    assert all(set(c) == ROW_KEYS for c in out["comparison"])
    assert (out["context"], out["kv_bytes_per_token"], out["gpu"]) == (8192, 67584, "H200")
    assert out["decode"]["cost_per_million_tokens"] > 0
    assert out["cuda_graph_pool_bytes"] > 0 and out["step_buffer_bytes"] > 0
    r = CliRunner().invoke(app, [*args, "--json", "--enforce-eager"])
    assert json.loads(r.stdout)["cuda_graph_pool_bytes"] == 0
    r = CliRunner().invoke(app, ["plan", "qwen2.5-7b", "--memory", "24GiB", "--json"])
    assert set(json.loads(r.stdout)) == JSON_KEYS and json.loads(r.stdout)["decode"] is None


def test_table_and_plot(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["plan", "llama-3.2-1b", "--gpu", "L4", "--price-per-hour", "0.8"])
    assert r.exit_code == 0, r.output
    for text in ("KV capacity", "max_num_seqs", "roofline est.", "int4", "USD / 1M output tokens",
                 "step buffers", "CUDA graph pool", "estimate, decode buckets"):  # fmt: skip
        assert text in r.stdout
    r = CliRunner().invoke(app, ["plan", "llama-3.2-1b", "--gpu", "L4", "--enforce-eager"])
    assert "none (CPU or --enforce-eager)" in r.stdout
    png = tmp_path / "plan.png"
    save_plot(plan("qwen2.5-72b", gpu="A100-80GB", weights="int4"), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


ERRORS = [
    (["nope-7b", "--gpu", "H200"], "presets: llama-3.2-1b"),
    (["llama-3.1-70b", "--memory", "24GiB"], "smaller than the weights (131.42 GiB) by 107.42 GiB"),
    (["llama-3.1-8b", "--memory", "24Gx"], "malformed size"),
    (["llama-3.1-8b", "--memory", "80GiB", "--gpu", "H200"], "exclusive"),
    (["llama-3.1-8b", "--gpu", "B9000"], "known: H100-80GB"),
    (["llama-3.1-8b", "--memory", "15GiB", "--weights", "bf16"], "less than one block"),
]


def test_cli_errors_are_one_line_exit_2() -> None:
    for args, expect in ERRORS:
        r = CliRunner().invoke(app, ["plan", *args])
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert expect in lines[0], (args, lines[0])
    # and as a user runs it
    args, expect = ERRORS[1]
    proc = subprocess.run(
        [sys.executable, "-m", "qserve.cli", "plan", *args], capture_output=True, text=True, timeout=120
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0]


def _header(path: Path) -> dict[str, dict[str, list[int]]]:
    return read_safetensors_header(path / "model.safetensors")
