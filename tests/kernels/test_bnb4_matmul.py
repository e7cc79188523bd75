"""The bitsandbytes NF4 / FP4 dequant-matmul: the reference against bitsandbytes, the Triton kernel (in Triton's
interpreter) against the reference over shapes, codebooks, double quantization and dtypes, and bad inputs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch

from qserve.kernels.bnb4_matmul import (
    Bnb4Weight,
    bnb4_matmul,
    bnb4_matmul_ref,
    bnb4_matmul_triton,
    dequantize_bnb4_ref,
)
from qserve.kernels.quant_matmul_configs import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _bnb_weight(
    n: int, k: int, quant_type: str, nested: bool, blocksize: int = 64, seed: int = 0
) -> tuple[Bnb4Weight, torch.Tensor, Any]:
    """A weight quantized by bitsandbytes itself (its CPU functions), read as qserve reads a QuantState."""
    import bitsandbytes.functional as bf

    w = torch.randn(n * k, generator=torch.Generator().manual_seed(seed)).view(n, k) * 0.1
    packed, qs = bf.quantize_4bit(
        w.to(torch.bfloat16), blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
    )
    return Bnb4Weight.from_quant_state(packed, qs), packed, qs


def _synthetic(n: int, k: int, nested: bool, blocksize: int, seed: int) -> Bnb4Weight:
    """Random codes and scales in bitsandbytes' layout (any codebook; blocks spanning rows, nested or not)."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-n * k // blocksize)
    code = torch.sort(torch.randn(16, generator=g)).values
    packed = torch.randint(0, 256, (-(-n * k // 2),), generator=g, dtype=torch.uint8)
    if not nested:
        return Bnb4Weight(packed, code, torch.rand(blocks, generator=g) + 0.1, blocksize, (n, k))
    absmax = torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8)
    nested_absmax = torch.rand(-(-blocks // 256), generator=g) + 0.5
    return Bnb4Weight(
        packed, code, absmax, blocksize, (n, k), torch.linspace(-1, 1, 256), nested_absmax, 256, 0.25
    )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize(
    ("n", "k", "blocksize"), [(64, 128, 64), (48, 96, 64), (40, 200, 128), (300, 64, 64)]
)
def test_reference_dequant_is_bitsandbytes(
    quant_type: str, nested: bool, n: int, k: int, blocksize: int
) -> None:
    import bitsandbytes.functional as bf

    w, packed, qs = _bnb_weight(n, k, quant_type, nested, blocksize)
    assert w.nested == nested and w.blocksize == blocksize and w.shape == (n, k)
    ours = dequantize_bnb4_ref(w, torch.bfloat16)
    if k % blocksize == 0:
        assert torch.equal(ours, bf.dequantize_4bit(packed, qs))  # bf16 (N, K)
    else:  # blocks span rows: bitsandbytes 0.50.2's CPU dequantize reads them per row (wrong, though its
        # quantizer's blocks are flat). The same weight as one (1, N K) row has the same bytes and blocks.
        flat, flat_qs = _bnb_weight(1, n * k, quant_type, nested, blocksize)[1:]
        assert torch.equal(flat.reshape(-1), packed.reshape(-1))
        assert torch.equal(ours.reshape(-1), bf.dequantize_4bit(flat, flat_qs).reshape(-1))


SHAPES = [(1, 64, 128), (5, 48, 96), (16, 40, 200), (33, 72, 64), (3, 130, 192)]  # (M, N, K)


@needs_triton
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
@pytest.mark.parametrize(
    ("quant_type", "nested"), [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference(
    interpret: None, m: int, n: int, k: int, quant_type: str, nested: bool, dtype: torch.dtype
) -> None:
    w, _, _ = _bnb_weight(n, k, quant_type, nested, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    got = bnb4_matmul_triton(x, w)
    ref = bnb4_matmul_ref(x, w)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)


@needs_triton
@pytest.mark.parametrize(
    ("m", "n", "k", "blocksize", "nested", "config"),
    [
        (3, 7, 34, 64, False, None),  # blocks span rows
        (4, 9, 50, 32, True, None),
        (17, 20, 64, 64, True, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "GROUP_M": 2}),  # BK > block
        (2, 300, 1024, 64, True, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1}),  # > 256 blocks
        (20, 24, 256, 128, False, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4}),  # row-aligned
    ],
)
def test_triton_layout_edges(
    interpret: None, m: int, n: int, k: int, blocksize: int, nested: bool, config: dict[str, int] | None
) -> None:
    w = _synthetic(n, k, nested, blocksize, seed=n * k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    got = bnb4_matmul_triton(x, w, config)
    torch.testing.assert_close(got, bnb4_matmul_ref(x, w), rtol=1e-4, atol=1e-4)
    # a plain float32 matmul of the reference weight checks the reference's own unpacking order
    ref_w = dequantize_bnb4_ref(w)
    flat = w.packed.reshape(-1)
    assert float(ref_w.reshape(-1)[0]) == float(w.code[int(flat[0]) >> 4] * _first_absmax(w))


def _first_absmax(w: Bnb4Weight) -> float:
    if w.nested_code is None or w.nested_absmax is None:
        return float(w.absmax[0])
    return float(w.nested_code[int(w.absmax[0])] * w.nested_absmax[0] + w.offset)


@needs_triton
def test_the_op_runs_triton_under_the_interpreter_and_keeps_leading_dims(interpret: None) -> None:
    w, _, _ = _bnb_weight(32, 64, "nf4", True)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = bnb4_matmul(x, w)
    assert y.shape == (2, 3, 32)
    torch.testing.assert_close(y.reshape(6, 32), bnb4_matmul_ref(x.reshape(6, 64), w), rtol=1e-2, atol=1e-2)


def test_the_op_on_cpu_is_the_reference() -> None:
    w, _, _ = _bnb_weight(32, 64, "fp4", False)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert torch.equal(bnb4_matmul(x, w), bnb4_matmul_ref(x, w))
    compiled = torch.compile(lambda t: bnb4_matmul(t, w), fullgraph=True)  # the custom op: no graph break
    assert torch.equal(compiled(x), bnb4_matmul_ref(x, w))


def test_empty_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    w = _synthetic(8, 64, False, 64, 0)
    assert bnb4_matmul(torch.zeros(0, 64), w).shape == (0, 8)
    if HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert bnb4_matmul_triton(torch.zeros(0, 64), w).shape == (0, 8)


@needs_triton
def test_bad_inputs_raise_clear_errors(interpret: None) -> None:
    w = _synthetic(8, 64, True, 64, 0)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"x must be \(M, 64\)"):
        bnb4_matmul_triton(torch.randn(2, 32), w)
    with pytest.raises(ValueError, match="in_features must be even"):
        bnb4_matmul_triton(torch.randn(2, 33), _synthetic(8, 33, False, 64, 0))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        bnb4_matmul_triton(x.to(torch.int32), w)
    with pytest.raises(ValueError, match="absmax must be torch.uint8"):
        bnb4_matmul_triton(x, replace(w, absmax=w.absmax.float()))
    with pytest.raises(ValueError, match="packed must be torch.uint8 with 256 elements"):
        bnb4_matmul_triton(x, replace(w, packed=w.packed[:-1]))
    with pytest.raises(ValueError, match="code must be torch.float32 with 16 elements"):
        bnb4_matmul_triton(x, replace(w, code=torch.zeros(8)))
    with pytest.raises(ValueError, match="nested_absmax must be"):
        bnb4_matmul_triton(x, replace(w, nested_absmax=torch.zeros(3)))
    with pytest.raises(ValueError, match="nested_absmax without nested_code"):
        bnb4_matmul_triton(x, replace(w, nested_code=None, absmax=torch.zeros(8, dtype=torch.float32)))
    with pytest.raises(ValueError, match="BLOCK_K must be a power of two"):
        bnb4_matmul_triton(x, w, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 24, "GROUP_M": 1})
    with pytest.raises(ValueError, match="bad blocksize"):
        bnb4_matmul_triton(x, replace(w, blocksize=0))
