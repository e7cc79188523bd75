"""The step's fixed allocations in the plan: the CUDA graph pool estimate by hand, and when it is counted."""

from __future__ import annotations

from pathlib import Path

from qserve.config import ModelConfig
from qserve.engine.cuda_graphs import capture_sizes
from qserve.planner import plan, plan_engine
from qserve.planner_step import cuda_graph_pool_bytes
from qserve.presets import load_model_source

MIB = 1 << 20


def _round(n: int) -> int:
    return -(-n // (2 * MIB)) * (2 * MIB)


def test_capture_sizes() -> None:
    assert capture_sizes(2048, 256)[-1] == 256 and len(capture_sizes(2048, 256)) == 35
    assert capture_sizes(2048, 8) == [1, 2, 4, 8]
    assert capture_sizes(6, 256) == [1, 2, 4, 6]  # the budget's own bucket
    assert capture_sizes(4096, 1024)[-1] == 256  # MAX_CAPTURE


def test_pool_llama_8b_bf16_by_hand() -> None:
    cfg = load_model_source("llama-3.1-8b").config  # hidden 4096, inter 14336, 32 / 8 heads of 128
    sizes = capture_sizes(2048, 256)
    assert sum(sizes) == 4231
    pool = 256 * 2 * (3 * 4096 + 4 * 14336) + 4231 * 4096 * 2  # MLP peak + every graph's output
    assert cuda_graph_pool_bytes(cfg, 256, 2048, 8192, 2, "bf16") == _round(pool) + 20 * MIB
    # batch 1 only: bucket 1 splits the context (8 KV heads x 1 seq << 132 SMs): 32 splits of 256 at 8192
    one = 1 * 2 * (3 * 4096 + 4 * 14336) + 1 * 32 * 32 * (128 + 2) * 4 + 4096 * 2
    assert cuda_graph_pool_bytes(cfg, 1, 2048, 8192, 2, "bf16") == _round(one)  # under 1 MiB: no big segment
    # int4 at bucket 1: split-K partials of the GEMV where its 64-wide tiles underfill the SMs (qkv 6144 and
    # o / down 4096 outputs; never more than the decode split scratch here)
    assert cuda_graph_pool_bytes(cfg, 1, 2048, 8192, 2, "int4") == _round(one)
    # int4 weights under fp32 activations dequantize: the gate/up weight (28672 x 4096) fp32 is a temporary
    fp32 = 256 * 4 * (3 * 4096 + 4 * 14336) + 28672 * 4096 * 4 + 4231 * 4096 * 4
    assert cuda_graph_pool_bytes(cfg, 256, 2048, 8192, 4, "int4") == _round(fp32) + 20 * MIB


def test_pool_moe_counts_its_experts() -> None:
    cfg = load_model_source("qwen3-30b-a3b").config
    assert cfg.moe is not None
    m, h = cfg.moe, cfg.hidden_size
    dense = 3 * cfg.hidden_size + 4 * cfg.intermediate_size
    moe = (
        3 * h + m.top_k * 4 * m.intermediate_size + 4 * m.shared_expert_intermediate_size + 2 * m.num_experts
    )
    got = cuda_graph_pool_bytes(cfg, 256, 2048, 4096, 2, "bf16")
    want = 256 * 2 * max(dense, moe) + sum(capture_sizes(2048, 256)) * h * 2
    assert got in (_round(want), _round(want) + 20 * MIB)


def test_pool_is_counted_on_cuda_only(tiny_llama: Path) -> None:
    cfg = ModelConfig.from_pretrained(tiny_llama)
    gpu = plan("llama-3.1-8b", gpu="H100-80GB")
    assert gpu.cuda_graph_pool_bytes == cuda_graph_pool_bytes(
        load_model_source("llama-3.1-8b").config, 256, 2048, 4096, 2, "bf16"
    )
    assert plan("llama-3.1-8b", gpu="H100-80GB", enforce_eager=True).cuda_graph_pool_bytes == 0
    assert plan("llama-3.1-8b", memory=40 << 30).cuda_graph_pool_bytes == 0  # a CPU budget
    cuda = plan("llama-3.1-8b", memory=40 << 30, device="cuda")
    assert cuda.cuda_graph_pool_bytes == gpu.cuda_graph_pool_bytes
    cpu = plan("llama-3.1-8b", memory=40 << 30)
    assert cuda.kv_cache_bytes == cpu.kv_cache_bytes - cuda.cuda_graph_pool_bytes
    # serve --memory-budget: the pool on CUDA unless eager; block tables at the engine's max_model_len
    budget = 64 * MIB
    on, off = plan_engine(str(tiny_llama), budget, device="cuda"), plan_engine(str(tiny_llama), budget)
    assert off.cuda_graph_pool_bytes == 0 < on.cuda_graph_pool_bytes
    assert plan_engine(str(tiny_llama), budget, device="cuda", enforce_eager=True).cuda_graph_pool_bytes == 0
    assert on.kv_cache_bytes == off.kv_cache_bytes - on.cuda_graph_pool_bytes
    wide = plan_engine(str(tiny_llama), budget, max_model_len=cfg.max_position_embeddings)
    assert wide.step_buffer_bytes == off.step_buffer_bytes  # max_model_len defaults to the model's
