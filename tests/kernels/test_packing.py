"""kernels/packing.py: bit-exact round trips, error bounds, AutoAWQ/GPTQ re-packing, quantization_config."""

from __future__ import annotations

import pytest
import torch

from qserve.kernels.packing import (
    QuantizedWeight,
    QuantSpec,
    awq_pack,
    gptq_pack,
    pack_int4,
    quantize,
    repack_awq,
    repack_gptq,
    unpack_int4,
)


def _expand(s: torch.Tensor, g: int) -> torch.Tensor:
    return s.float().repeat_interleave(g, dim=-1)  # (N, K/G) -> (N, K)


def test_int4_pack_unpack_round_trip_bit_exact() -> None:
    q = torch.randint(0, 16, (48, 256), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 128)
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed[0, 0], (q[0, 0] | (q[0, 1] << 4)).to(torch.uint8))  # k even = low nibble


def test_int4_pack_rejects_odd_k() -> None:
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(4, 7, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_bound_and_layout(dtype: torch.dtype, group_size: int) -> None:
    torch.manual_seed(0)
    w = (torch.randn(64, 256) * 0.05).to(dtype)
    w[3, :group_size] = torch.rand(group_size) + 0.5  # a group entirely above zero
    w[5, :group_size] = 0.0  # an all-zero group
    qw = quantize(w, "int4", group_size)
    assert qw.qweight.shape == (64, 128) and qw.qweight.dtype == torch.uint8
    assert qw.scales.shape == (64, 256 // group_size) and qw.scales.dtype == dtype
    assert qw.zeros is not None and qw.zeros.dtype == torch.uint8 and int(qw.zeros.max()) <= 15
    err = (qw.dequantize(torch.float32) - w.float()).abs()
    assert bool((err <= _expand(qw.scales, group_size) * 0.5 * (1 + 1e-6)).all())
    assert bool((qw.dequantize(torch.float32)[5, :group_size] == 0).all())
    assert qw.dequantize().dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_error_bound_and_layout(dtype: torch.dtype) -> None:
    w = (torch.randn(32, 96) * 0.1).to(dtype)
    qw = quantize(w, "int8")
    assert qw.qweight.dtype == torch.int8 and qw.scales.shape == (32,) and qw.zeros is None
    assert int(qw.qweight.abs().max()) <= 127 and qw.group_size == -1
    err = (qw.dequantize(torch.float32) - w.float()).abs()
    assert bool((err <= qw.scales.float()[:, None] * 0.5 * (1 + 1e-6)).all())


def test_quantize_rejects_bad_group_and_kind() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        quantize(torch.randn(8, 96), "int4", 64)
    with pytest.raises(ValueError, match="int4 or int8"):
        quantize(torch.randn(8, 64), "int3", 32)


def test_tensors_round_trip_and_cat() -> None:
    a, b = quantize(torch.randn(16, 64), "int4", 32), quantize(torch.randn(8, 64), "int4", 32)
    back = QuantizedWeight.from_tensors(a.tensors(), "int4", 32)
    assert torch.equal(back.dequantize(), a.dequantize())
    fused = QuantizedWeight.cat([a, b])
    assert fused.out_features == 24
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    with pytest.raises(ValueError):
        QuantizedWeight.from_tensors(a.tensors(), "int4", 64)


def _reference(q_kn: torch.Tensor, z: torch.Tensor, s: torch.Tensor, g: int) -> torch.Tensor:
    """Published dequant, in fp16 like AutoAWQ/GPTQ: (q - z) * s, (K, N) -> transposed (N, K)."""
    zk, sk = z.repeat_interleave(g, 0).half(), s.repeat_interleave(g, 0)
    return ((q_kn.half() - zk) * sk).t()


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_gemm_repack_bit_exact(group_size: int) -> None:
    k, n = 256, 64
    q = torch.randint(0, 16, (k, n))
    z = torch.randint(0, 16, (k // group_size, n))
    s = (torch.rand(k // group_size, n) * 0.02).half()
    qw = repack_awq({"qweight": awq_pack(q), "qzeros": awq_pack(z), "scales": s}, group_size)
    assert torch.equal(qw.dequantize(torch.float16), _reference(q, z, s, group_size))
    # nibble order check: column 1 lives in nibble 4 (bits 16..19) of the first int32
    packed = awq_pack(q)
    assert int((packed[0, 0] >> 16) & 0xF) == int(q[0, 1])


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("v2", [False, True])
def test_gptq_repack_bit_exact(sym: bool, v2: bool) -> None:
    k, n, g = 256, 48, 64
    q = torch.randint(0, 16, (k, n))
    z = torch.full((k // g, n), 8) if sym else torch.randint(1, 16, (k // g, n))
    s = (torch.rand(k // g, n) * 0.02).half()
    offset = 0 if v2 else 1
    qweight, qzeros = gptq_pack(q, z, offset)
    assert qweight.shape == (k // 8, n) and qzeros.shape == (k // g, n // 8)
    assert int(qweight[0, 0] & 0xF) == int(q[0, 0]) and int((qweight[0, 0] >> 4) & 0xF) == int(q[1, 0])
    t = {"qweight": qweight, "qzeros": qzeros, "scales": s, "g_idx": torch.arange(k, dtype=torch.int32) // g}
    qw = repack_gptq(t, g, offset)
    assert torch.equal(qw.dequantize(torch.float16), _reference(q, z, s, g))


def test_gptq_rejects_act_order() -> None:
    q, z = torch.randint(0, 16, (64, 16)), torch.full((2, 16), 8)
    qweight, qzeros = gptq_pack(q, z)
    g_idx = torch.randperm(64) // 32
    with pytest.raises(ValueError, match="act-order"):
        repack_gptq(
            {"qweight": qweight, "qzeros": qzeros, "scales": torch.ones(2, 16).half(), "g_idx": g_idx}, 32
        )


def test_quant_spec_from_config() -> None:
    assert QuantSpec.from_config(None) is None
    ours = QuantSpec.from_config(
        {"quant_method": "qserve", "format_version": 1, "weights": "int4", "group_size": 64, "method": "awq"}
    )
    assert ours is not None and (ours.source, ours.weights, ours.group_size, ours.method) == (
        "qserve",
        "int4",
        64,
        "awq",
    )
    awq = QuantSpec.from_config(
        {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "GEMM", "zero_point": True}
    )
    assert awq is not None and awq.source == "awq" and awq.group_size == 128
    gptq = QuantSpec.from_config(
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}
    )
    assert gptq is not None and gptq.zero_offset == 1 and gptq.sym
    v2 = QuantSpec.from_config(
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}
    )
    assert v2 is not None and v2.zero_offset == 0
    for bad in (
        {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
        {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True},
        {"quant_method": "gptq", "bits": 8, "group_size": 128},
        {"quant_method": "bitsandbytes"},
        {"quant_method": "qserve", "format_version": 2, "weights": "int4", "group_size": 128},
    ):
        with pytest.raises(ValueError):
            QuantSpec.from_config(bad)


def test_quant_spec_malformed_configs_raise_value_error() -> None:
    for bad in (
        {"quant_method": "qserve", "format_version": 1, "weights": "int4"},  # no group_size
        {"quant_method": "awq", "bits": "four"},
        ["not", "a", "dict"],
    ):
        with pytest.raises(ValueError):
            QuantSpec.from_config(bad)  # type: ignore[arg-type]
