"""qserve's native CPU bf16 linear (kernels/cpu_gemm.cpp) against an fp32 reference over many shapes, its
packed layout exactly, its errors, and torch.compile with no graph break."""

from __future__ import annotations

import pytest
import torch

from qserve.kernels import cpu_native

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="needs AVX512-BF16 and a C++ compiler")


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.float() @ w.float().t()
    return y + b.float() if b is not None else y


def assert_bf16_close(y: torch.Tensor, ref: torch.Tensor, k: int) -> None:
    """Within one bf16 rounding of the fp32 result, plus fp32 summation-order noise."""
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    err = (y.float() - ref).abs()
    bound = ref.abs() * 2**-8 + 1e-5 * k**0.5 * ref.abs().max()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 17, 64, 65, 130])
@pytest.mark.parametrize(("k", "n"), [(2, 16), (30, 17), (64, 48), (128, 100), (256, 384), (96, 1000)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_fp32_reference(m: int, k: int, n: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    y = cpu_native.linear_bf16(x, cpu_native.pack_bf16(w), b, n)
    assert_bf16_close(y, reference(x, w, b), k)


def test_leading_dims_threads_and_empty_batch() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 64, generator=g).bfloat16()
    packed = cpu_native.pack_bf16(w)
    x = torch.randn(2, 3, 64, generator=g).bfloat16()
    y = cpu_native.linear_bf16(x, packed, None, 200)
    assert y.shape == (2, 3, 200)
    assert_bf16_close(y, reference(x.reshape(6, 64), w, None).reshape(2, 3, 200), 64)
    big = torch.randn(300, 64, generator=g).bfloat16()  # enough work to split over threads
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(cpu_native.linear_bf16(big, packed, None, 200))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])  # each output element is one task's sum: no thread-count effect
    assert cpu_native.linear_bf16(big[:0], packed, None, 200).shape == (0, 200)
    xs = torch.randn(64, 128, generator=g).bfloat16()[:, ::2]  # non-contiguous input
    assert_bf16_close(cpu_native.linear_bf16(xs, packed, None, 200), reference(xs, w, None), 64)


def test_pack_layout_is_exact() -> None:
    n, k = 20, 6
    w = torch.arange(n * k, dtype=torch.float32).reshape(n, k).bfloat16()
    p = cpu_native.pack_bf16(w)
    assert p.shape == (2, 3, 16, 2) and p.is_contiguous()
    for row in range(32):
        for col in range(k):
            expect = w[row, col] if row < n else 0.0
            assert p[row // 16, col // 2, row % 16, col % 2] == expect


def test_errors() -> None:
    w = torch.randn(32, 16).bfloat16()
    packed = cpu_native.pack_bf16(w)
    x = torch.randn(2, 16).bfloat16()
    with pytest.raises(RuntimeError, match="features"):
        cpu_native.linear_bf16(torch.randn(2, 18).bfloat16(), packed, None, 32)
    with pytest.raises(RuntimeError, match="bf16"):
        cpu_native.linear_bf16(x.float(), packed, None, 32)
    with pytest.raises(RuntimeError, match="out_features"):
        cpu_native.linear_bf16(x, packed, None, 48)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_native.linear_bf16(x, packed, torch.zeros(31).bfloat16(), 32)
    with pytest.raises(RuntimeError, match="packed layout"):
        cpu_native.linear_bf16(x, w, None, 32)
    with pytest.raises(RuntimeError, match="even"):
        cpu_native.pack_bf16(torch.randn(16, 15).bfloat16())


def test_compiles_without_graph_break() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 64, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    packed = cpu_native.pack_bf16(w)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(cpu_native.linear_bf16(x * 2, packed, b, 96))

    explained = torch._dynamo.explain(f)(torch.randn(5, 64).bfloat16())
    assert explained.graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    for m in (1, 7, 33):
        x = torch.randn(m, 64, generator=g).bfloat16()
        assert torch.equal(compiled(x), f(x))


def test_opcheck() -> None:
    w = torch.randn(48, 32).bfloat16()
    args = (torch.randn(3, 32).bfloat16(), cpu_native.pack_bf16(w), torch.randn(48).bfloat16(), 48)
    torch.library.opcheck(
        torch.ops.qserve_cpu.linear_bf16.default, args, test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.parametrize("m", [1, 3, 8, 40])
def test_min_thread_work_changes_threads_not_results(m: int) -> None:
    """The one-thread threshold of the panel linears (bf16, int4, int8) decides how a call splits over threads,
    never what it computes: one thread (huge threshold) and every task split off (threshold 1) agree bit for
    bit, at the decode (codes) and the tile paths."""
    from tests.kernels.test_cpu_native_w4 import random_int4
    from tests.kernels.test_cpu_native_w8 import random_int8

    g = torch.Generator().manual_seed(m)
    n, k = 1536, 256  # the demo's gate_up: 393K multiply-adds a row, over the default threshold at one row
    x = torch.randn(m, k, generator=g).bfloat16()
    w = cpu_native.pack_bf16(torch.randn(n, k, generator=g).bfloat16())
    w4 = cpu_native.pack_w4(*random_int4(n, k, 128, seed=m), 128)
    w8 = cpu_native.pack_w8(*random_int8(n, k, seed=m))
    calls = {
        "bf16": lambda: cpu_native.linear_bf16(x, w, None, n),
        "int4": lambda: cpu_native.linear_w4(x, w4, None, n, 128),
        "int8": lambda: cpu_native.linear_w8(x, w8, None, n),
    }
    threads = torch.get_num_threads()
    default = cpu_native.set_min_thread_work(1)
    try:
        assert default == 1 << 18
        torch.set_num_threads(2)
        split = {name: f() for name, f in calls.items()}
        assert cpu_native.set_min_thread_work(1 << 40) == 1
        alone = {name: f() for name, f in calls.items()}
    finally:
        cpu_native.set_min_thread_work(default)
        torch.set_num_threads(threads)
    for name in calls:
        assert torch.equal(split[name], alone[name]), name
    with pytest.raises(RuntimeError, match="at least 1"):
        cpu_native.set_min_thread_work(0)
    assert cpu_native.set_min_thread_work(default) == default
