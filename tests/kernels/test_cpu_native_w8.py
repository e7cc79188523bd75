"""qserve's native CPU int8 linear (kernels/cpu_gemm_w8.cpp): both paths (codes up to 8 rows, dequantized
tiles above) against an fp32 reference over many shapes, the packed layout exactly, its errors, and
torch.compile with no graph break."""

from __future__ import annotations

import pytest
import torch

from qserve.kernels import cpu_native

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="needs AVX512-BF16 and a C++ compiler")


def random_int8(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), generator=gen).to(torch.int8)
    return q, (torch.rand(n, generator=gen) / 64 + 1e-4).bfloat16().float()


def assert_close(y: torch.Tensor, ref: torch.Tensor, k: int, m: int, mag: torch.Tensor) -> None:
    """One bf16 rounding plus fp32 summation noise; the tile path (m > 8) also rounds each weight to bf16,
    up to 2^-9 of each |x w| term (``mag`` = |x| @ |W|^T)."""
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    err = (y.float() - ref).abs()
    bound = ref.abs() * 2**-8 + 2e-5 * k**0.5 * ref.abs().max()
    if m > 8:
        bound = bound + 2**-8 * mag
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16, 65, 130])
@pytest.mark.parametrize(("k", "n"), [(2, 16), (30, 17), (64, 48), (256, 100), (512, 384)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_fp32_reference(m: int, k: int, n: int, bias: bool) -> None:
    q, s = random_int8(n, k, seed=m * 1000 + k + n)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    y = cpu_native.linear_w8(x, cpu_native.pack_w8(q, s), b, n)
    w = q.float() * s[:, None]
    ref = x.float() @ w.t() + (b.float() if b is not None else 0.0)
    assert_close(y, ref, k, m, x.float().abs() @ w.abs().t())


def test_pack_layout_is_exact() -> None:
    q = torch.arange(-60, 60, dtype=torch.int8).reshape(20, 6)
    s = torch.arange(20, dtype=torch.float32) + 1
    codes, scales = cpu_native.pack_w8(q, s)
    assert codes.shape == (2, 3, 16, 2) and codes.dtype == torch.uint8 and scales.shape == (2, 16)
    for col in range(32):
        for kk in range(6):
            expect = int(q[col, kk]) + 128 if col < 20 else 128
            assert int(codes[col // 16, kk // 2, col % 16, kk % 2]) == expect
        assert scales[col // 16, col % 16] == (s[col] if col < 20 else 0)


def test_rows_are_independent_within_a_path_and_threads() -> None:
    q, s = random_int8(96, 128, seed=9)
    w8 = cpu_native.pack_w8(q, s)
    x = torch.randn(64, 128).bfloat16()
    for lo, hi in ((1, 8), (9, 64)):  # the code path, the tile path
        full = cpu_native.linear_w8(x[:hi], w8, None, 96)
        for m in range(lo, hi + 1):
            assert torch.equal(cpu_native.linear_w8(x[:m], w8, None, 96), full[:m])
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(cpu_native.linear_w8(x, w8, None, 96))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    assert cpu_native.linear_w8(x[:0], w8, None, 96).shape == (0, 96)


def test_errors() -> None:
    q, s = random_int8(32, 16, seed=1)
    w8 = cpu_native.pack_w8(q, s)
    x = torch.randn(2, 16).bfloat16()
    with pytest.raises(RuntimeError, match="features"):
        cpu_native.linear_w8(torch.randn(2, 18).bfloat16(), w8, None, 32)
    with pytest.raises(RuntimeError, match="bf16"):
        cpu_native.linear_w8(x.float(), w8, None, 32)
    with pytest.raises(RuntimeError, match="out_features"):
        cpu_native.linear_w8(x, w8, None, 48)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_native.linear_w8(x, w8, torch.zeros(31).bfloat16(), 32)
    with pytest.raises(RuntimeError, match="fp32"):
        cpu_native.linear_w8(x, (w8[0], w8[1].double()), None, 32)
    with pytest.raises(RuntimeError, match="packed int8 layout"):
        cpu_native.linear_w8(x, (w8[0].view(2, -1), w8[1]), None, 32)
    with pytest.raises(ValueError, match="even"):
        cpu_native.pack_w8(torch.zeros(16, 15, dtype=torch.int8), torch.ones(16))
    with pytest.raises(ValueError, match="do not match"):
        cpu_native.pack_w8(q, s[:3])


def test_compiles_without_graph_break_and_opcheck() -> None:
    q, s = random_int8(96, 64, seed=11)
    w8 = cpu_native.pack_w8(q, s)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(cpu_native.linear_w8(x * 2, w8, None, 96))

    assert torch._dynamo.explain(f)(torch.randn(5, 64).bfloat16()).graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for m in (1, 7, 33):
        x = torch.randn(m, 64).bfloat16()
        assert torch.equal(compiled(x), f(x))
    args = (torch.randn(3, 64).bfloat16(), *w8, torch.randn(96).bfloat16(), 96)
    torch.library.opcheck(
        torch.ops.qserve_cpu.linear_w8.default, args, test_utils=("test_schema", "test_faketensor")
    )
