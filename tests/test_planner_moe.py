"""The planner on MoE models: all experts resident, top_k of them read per token; presets and local dirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors import safe_open

from qserve.planner import plan
from qserve.planner_memory import decode_estimate, experts_hit_fraction
from qserve.presets import find_gpu, linear_bytes, load_model_source


@pytest.mark.parametrize(
    ("name", "total", "active", "bf16_gb", "int4_gb"),
    [("mixtral-8x7b", 46.70e9, 12.88e9, 93.4, 24.8), ("qwen3-30b-a3b", 30.53e9, 3.35e9, 61.1, 16.9)],
)
def test_moe_presets(name: str, total: float, active: float, bf16_gb: float, int4_gb: float) -> None:
    inv = load_model_source(name).inventory
    assert inv.num_params == pytest.approx(total, rel=1e-3)
    assert inv.active_params == pytest.approx(active, rel=1e-3)
    assert inv.nbytes("bf16") / 1e9 == pytest.approx(bf16_gb, rel=2e-3)
    assert inv.nbytes("int4") / 1e9 == pytest.approx(int4_gb, rel=2e-3)
    assert inv.active_expert_nbytes("int4") == int(inv.expert_nbytes("int4") * inv.active_fraction)


def test_qwen3_30b_expert_bytes_exact() -> None:
    inv = load_model_source("Qwen/Qwen3-30B-A3B").inventory
    per_expert = 2 * linear_bytes(768, 2048, "int4") + linear_bytes(2048, 768, "int4")
    assert inv.expert_nbytes("int4") == 48 * 128 * per_expert
    assert inv.active_fraction == 8 / 128
    p = plan("qwen3-30b-a3b", gpu="H100", weights="int4")
    assert p.expert_weights_bytes == 48 * 128 * per_expert
    assert p.active_expert_weights_bytes == int(48 * 128 * per_expert / 16)
    assert p.weights_bytes == inv.nbytes("int4")


def test_dense_models_have_no_expert_bytes() -> None:
    p = plan("llama-3.1-8b", gpu="H100")
    assert p.expert_weights_bytes == 0 and p.active_expert_weights_bytes == 0
    inv = load_model_source("llama-3.1-8b").inventory
    assert inv.active_params == inv.num_params


def test_decode_roofline_reads_only_hit_experts() -> None:
    src, gpu = load_model_source("qwen3-30b-a3b"), find_gpu("H100")
    wb, eb = src.inventory.nbytes("int4"), src.inventory.expert_nbytes("int4")
    one = decode_estimate(gpu, src, wb, 0, 1, 1, expert_bytes=eb)
    assert one.bound == "memory"
    assert one.step_seconds == pytest.approx(int(wb - eb * (1 - 1 / 16)) / gpu.bandwidth, rel=1e-9)
    big = decode_estimate(gpu, src, wb, 0, 256, 1, expert_bytes=eb)  # 256 tokens hit ~every expert
    assert experts_hit_fraction(1 / 16, 256) > 0.99
    assert big.step_seconds >= 0.99 * wb / gpu.bandwidth
    assert experts_hit_fraction(0.25, 0) == 0.0 and experts_hit_fraction(1.0, 1) == 1.0


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_local_moe_directory_counts_stored_expert_bytes(
    arch: str, tiny_model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    from qserve.converters import convert

    src = tiny_model_factory(arch)
    for path in (src, convert(src, tmp_path / "q", group_size=32, progress=False)):
        expected = 0
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            for name in f.keys():  # noqa: SIM118
                if ".experts." in name:
                    t = f.get_tensor(name)
                    expected += t.numel() * t.element_size()
        inv = load_model_source(str(path)).inventory
        assert inv.expert_nbytes("auto") == expected > 0
        assert plan(str(path), memory=1 << 30).expert_weights_bytes == expected
