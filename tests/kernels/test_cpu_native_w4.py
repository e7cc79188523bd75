"""qserve's native CPU int4 linear (kernels/cpu_gemm_w4.cpp): both paths (codes up to 8 rows, dequantized
tiles above) against an fp32 reference over many shapes, the packed layout and the dequantized panels exactly,
its errors, and torch.compile with no graph break."""

from __future__ import annotations

import pytest
import torch

from qserve.kernels import cpu_native
from qserve.kernels.packing import QuantizedWeight, pack_int4

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="needs AVX512-BF16 and a C++ compiler")


def random_int4(n: int, k: int, g: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes (N, K) int64 in [0, 15], bf16-valued fp32 scales and uint8 zeros (N, K/G) (GPTQ v1's 16 too)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen)
    s = (torch.rand(n, k // g, generator=gen) / 32 + 1e-3).bfloat16().float()
    z = torch.randint(0, 17, (n, k // g), generator=gen).to(torch.uint8)
    return q, s, z


def dequantized(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, g: int) -> torch.Tensor:
    n, k = q.shape
    return ((q.view(n, k // g, g).float() - z.float()[..., None]) * s[..., None]).view(n, k)  # (N, K) fp32


def assert_close(y: torch.Tensor, ref: torch.Tensor, k: int, m: int, mag: torch.Tensor | None = None) -> None:
    """The code path is exact up to fp32 summation and one bf16 rounding; the tile path (m > 8) also rounds
    each weight to bf16 (as `QuantizedWeight.dequantize(bf16)` does), up to 2^-9 of each |x w| term
    (``mag`` = |x| @ |W|^T)."""
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    err = (y.float() - ref).abs()
    bound = ref.abs() * 2**-8 + 1e-5 * k**0.5 * ref.abs().max()
    if m > 8:
        assert mag is not None
        bound = bound + 2**-8 * mag
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 64, 65, 130])
@pytest.mark.parametrize(
    ("k", "n", "g"), [(4, 16, 4), (32, 17, 32), (64, 48, 16), (128, 100, 64), (256, 384, 128)]
)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_fp32_reference(m: int, k: int, n: int, g: int, bias: bool) -> None:
    q, s, z = random_int4(n, k, g, seed=m * 1000 + k + n)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    y = cpu_native.linear_w4(x, cpu_native.pack_w4(q, s, z, g), b, n, g)
    w = dequantized(q, s, z, g)
    ref = x.float() @ w.t() + (b.float() if b is not None else 0.0)
    assert_close(y, ref, k, m, x.float().abs() @ w.abs().t())


def test_agrees_with_qserve_dequantize() -> None:
    """The same weights through `QuantizedWeight` (qserve's checkpoint layout) and through `pack_w4`."""
    q, s, z = random_int4(50, 256, 64, seed=3)
    qw = QuantizedWeight(pack_int4(q), s.bfloat16(), z, "int4", 64, 256, 50)
    x = torch.randn(4, 256).bfloat16()
    y = cpu_native.linear_w4(x, cpu_native.pack_w4(q, s, z, 64), None, 50, 64)
    assert_close(y, x.float() @ qw.dequantize(torch.float32).t(), 256, 4)


def test_pack_layout_is_exact() -> None:
    n, k, g = 20, 8, 4
    q = (torch.arange(n * k) % 16).reshape(n, k)
    s = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 1
    z = (torch.arange(n * 2) % 16).reshape(n, 2).to(torch.uint8)
    codes, scales, zeros = cpu_native.pack_w4(q, s, z, g)
    assert codes.shape == (2, 2, 16, 2) and codes.dtype == torch.uint8 and codes.is_contiguous()
    assert scales.shape == zeros.shape == (2, 2, 16) and scales.dtype == torch.float32
    for col in range(32):
        p, j = divmod(col, 16)
        for kk in range(k):
            t, rest = divmod(kk, 4)
            h, e = divmod(rest, 2)
            byte = int(codes[p, t, j, e])
            expect = int(q[col, kk]) if col < n else 0
            assert (byte >> 4 if h else byte & 0xF) == expect
        for grp in range(2):
            assert scales[p, grp, j] == (s[col, grp] if col < n else 0)
            assert zeros[p, grp, j] == (z[col, grp] if col < n else 0)


def test_dequantized_panels_equal_bf16_dequantize() -> None:
    """The tile path multiplies by these: each weight rounded once to bf16, at most one bf16 step from
    rounding (q - z) * s (the kernel computes it as an fma on 128 + q)."""
    n, k, g = 40, 128, 32
    q, s, z = random_int4(n, k, g, seed=5)
    w4 = cpu_native.pack_w4(q, s, z, g)
    panels = torch.ops.qserve_cpu.dequant_w4(*w4, g)  # (P, K/2, 16, 2)
    w = panels.permute(0, 2, 1, 3).reshape(-1, k)[:n]
    expect = dequantized(q, s, z, g).bfloat16()
    diff = (w.float() - expect.float()).abs()
    assert bool((diff <= expect.float().abs() * 2**-7).all())
    assert (diff == 0).float().mean() > 0.99  # almost all bit-identical


def test_threads_leading_dims_empty_and_strided() -> None:
    q, s, z = random_int4(200, 64, 32, seed=7)
    w4 = cpu_native.pack_w4(q, s, z, 32)
    w = dequantized(q, s, z, 32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, generator=gen).bfloat16()
    y = cpu_native.linear_w4(x, w4, None, 200, 32)
    assert y.shape == (2, 3, 200)
    assert_close(y.reshape(6, 200), x.reshape(6, 64).float() @ w.t(), 64, 6)
    threads = torch.get_num_threads()
    try:
        for m in (1, 8, 300):  # both paths
            big = torch.randn(m, 64, generator=gen).bfloat16()
            outs = []
            for t in (1, 2):
                torch.set_num_threads(t)
                outs.append(cpu_native.linear_w4(big, w4, None, 200, 32))
            assert torch.equal(outs[0], outs[1])  # one task per output element: no thread-count effect
            # each row's result does not depend on the other rows of its path
            assert torch.equal(outs[0][:1], cpu_native.linear_w4(big[:1], w4, None, 200, 32)) or m > 8
    finally:
        torch.set_num_threads(threads)
    assert cpu_native.linear_w4(x[0, :0], w4, None, 200, 32).shape == (0, 200)
    xs = torch.randn(5, 128, generator=gen).bfloat16()[:, ::2]
    assert_close(cpu_native.linear_w4(xs, w4, None, 200, 32), xs.float() @ w.t(), 64, 5)


def test_rows_are_independent_within_a_path() -> None:
    """Eager and compiled steps pad the batch differently (M vs its bucket): a row must not change."""
    q, s, z = random_int4(96, 128, 64, seed=9)
    w4 = cpu_native.pack_w4(q, s, z, 64)
    x = torch.randn(64, 128).bfloat16()
    for lo, hi in ((1, 8), (9, 64)):  # the code path, the tile path
        full = cpu_native.linear_w4(x[:hi], w4, None, 96, 64)
        for m in range(lo, hi + 1):
            assert torch.equal(cpu_native.linear_w4(x[:m], w4, None, 96, 64), full[:m])


def test_errors() -> None:
    q, s, z = random_int4(32, 16, 8, seed=1)
    w4 = cpu_native.pack_w4(q, s, z, 8)
    x = torch.randn(2, 16).bfloat16()
    with pytest.raises(RuntimeError, match="features"):
        cpu_native.linear_w4(torch.randn(2, 20).bfloat16(), w4, None, 32, 8)
    with pytest.raises(RuntimeError, match="bf16"):
        cpu_native.linear_w4(x.float(), w4, None, 32, 8)
    with pytest.raises(RuntimeError, match="out_features"):
        cpu_native.linear_w4(x, w4, None, 48, 8)
    with pytest.raises(RuntimeError, match="group size"):
        cpu_native.linear_w4(x, w4, None, 32, 6)
    with pytest.raises(RuntimeError, match="scales and zeros"):
        cpu_native.linear_w4(x, w4, None, 32, 4)  # the scales hold 2 groups, not 4
    with pytest.raises(RuntimeError, match="bias"):
        cpu_native.linear_w4(x, w4, torch.zeros(31).bfloat16(), 32, 8)
    with pytest.raises(RuntimeError, match="fp32"):
        cpu_native.linear_w4(x, (w4[0], w4[1].double(), w4[2]), None, 32, 8)
    with pytest.raises(RuntimeError, match="packed int4 layout"):
        cpu_native.linear_w4(x, (w4[0].view(2, -1), w4[1], w4[2]), None, 32, 8)
    with pytest.raises(ValueError, match="multiples of 4"):
        cpu_native.pack_w4(torch.zeros(16, 18, dtype=torch.long), torch.ones(16, 3), torch.zeros(16, 3), 6)
    with pytest.raises(ValueError, match="do not match"):
        cpu_native.pack_w4(q, s[:, :1], z, 8)


def test_compiles_without_graph_break() -> None:
    q, s, z = random_int4(96, 64, 32, seed=11)
    w4 = cpu_native.pack_w4(q, s, z, 32)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(cpu_native.linear_w4(x * 2, w4, None, 96, 32))

    explained = torch._dynamo.explain(f)(torch.randn(5, 64).bfloat16())
    assert explained.graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for m in (1, 7, 33):
        x = torch.randn(m, 64).bfloat16()
        assert torch.equal(compiled(x), f(x))


def test_opcheck() -> None:
    q, s, z = random_int4(48, 32, 16, seed=2)
    args = (
        torch.randn(3, 32).bfloat16(),
        *cpu_native.pack_w4(q, s, z, 16),
        torch.randn(48).bfloat16(),
        48,
        16,
    )
    torch.library.opcheck(
        torch.ops.qserve_cpu.linear_w4.default, args, test_utils=("test_schema", "test_faketensor")
    )
    torch.library.opcheck(
        torch.ops.qserve_cpu.dequant_w4.default,
        (*cpu_native.pack_w4(q, s, z, 16), 16),
        test_utils=("test_schema", "test_faketensor"),
    )
