"""W4A16 / W8A16 Triton kernels against the pure-torch reference, in Triton's interpreter on CPU.

The ``interpret`` fixture sets TRITON_INTERPRET=1 for one test: the module runs its Triton kernels in the
interpreter then, whichever mode triton was imported in. Outputs are poisoned with NaN before each run, so an
element no program writes fails the check. Shapes stay small: the interpreter runs every program in Python.
Tests marked ``gpu`` run the same checks at realistic sizes on CUDA (skipped without one).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from qserve.kernels import quant_matmul
from qserve.kernels.packing import QuantizedWeight, quantize
from qserve.kernels.quant_matmul import (
    DEQUANT_MIN_M,
    GEMV_MAX_M,
    HAS_TRITON,
    choose_path,
    dequantize_triton,
    gemm_configs,
    gemv_configs,
    matmul_int4_triton,
    matmul_int8_triton,
    prune_configs,
    quant_matmul_ref,
    split_k_for,
)

qm = sys.modules["qserve.kernels.quant_matmul"]  # the module (the package attribute is the function)
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
F16, BF16 = torch.float16, torch.bfloat16
GEMV_CFG = dict(BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1)  # several tiles on small shapes
GEMM_CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def no_interpret(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield


def make(
    m: int, n: int, k: int, weights: str, group: int, dtype: torch.dtype, seed: int, device: str = "cpu"
) -> tuple[torch.Tensor, QuantizedWeight]:
    """Fresh random activations (M, K) and an RTN-quantized random (N, K) weight with scales in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    qw = quantize(w.to(dtype), weights, group if group > 0 else 128, scale_dtype=dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    if device != "cpu":
        qw = QuantizedWeight(
            qw.qweight.to(device),
            qw.scales.to(device),
            None if qw.zeros is None else qw.zeros.to(device),
            qw.weights,
            qw.group_size,
            qw.in_features,
            qw.out_features,
        )
        x = x.to(device)
    return x, qw


def reference(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """x.float() @ dequant(W).float().T, all in float32."""
    return x.float() @ qw.dequantize(torch.float32).T


def assert_matches(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> None:
    """Relative (Frobenius) error <= tol, and no element off by more than 2 tol of the largest (NaN fails)."""
    assert out.shape == ref.shape
    diff = out.float() - ref
    rel = (diff.norm() / ref.norm()).item()
    worst = (diff.abs().max() / ref.abs().max()).item()
    assert rel <= tol, f"relative error {rel:.3g} > {tol}"
    assert worst <= 2 * tol, f"max error {worst:.3g} of max |ref| > {2 * tol}"


def _forbidden(*args: object) -> torch.Tensor:
    raise AssertionError("took the reference path")


def poisoned(m: int, n: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype, device=device)


def run(x: torch.Tensor, qw: QuantizedWeight, out: torch.Tensor | None = None, **kw: object) -> torch.Tensor:
    if qw.weights == "int4":
        assert qw.zeros is not None
        return matmul_int4_triton(x, qw.qweight, qw.scales, qw.zeros, qw.group_size, out=out, **kw)  # type: ignore[arg-type]
    return matmul_int8_triton(x, qw.qweight, qw.scales, out=out, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- interpreter: the kernels

# (N, K) per group size: N is not a multiple of the 32-wide tiles, K spans several BLOCK_K slices.
INT4_SHAPES = {32: (72, 96), 64: (200, 192), 128: (136, 256)}


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 16, 33, 128])
def test_int4_matches_reference(m: int, group: int, dtype: torch.dtype) -> None:
    n, k = INT4_SHAPES[group]
    x, qw = make(m, n, k, "int4", group, dtype, seed=m * 1000 + group)
    path = choose_path(m)
    config = GEMV_CFG if path == "gemv" else dict(GEMM_CFG, BLOCK_M=16 if m < 64 else 64)
    config = {**config, "BLOCK_K": min(config["BLOCK_K"], group)}
    split = 1 if dtype == F16 else 3  # 3 slices of 3..8 K blocks: uneven, some slices short
    out = run(x, qw, poisoned(m, n, dtype), path=path, split_k=split, config=config)
    assert out.dtype == dtype
    assert_matches(out, reference(x, qw))


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 16, 33, 128])
def test_int8_matches_reference(m: int, dtype: torch.dtype) -> None:
    n, k = 72, 200  # K = 3 x 64 + 8: the last K block is partial
    x, qw = make(m, n, k, "int8", -1, dtype, seed=m)
    path = choose_path(m)
    config = dict(GEMV_CFG) if path == "gemv" else dict(GEMM_CFG, BLOCK_M=16 if m < 64 else 64, BLOCK_K=64)
    split = 1 if dtype == F16 else 2
    out = run(x, qw, poisoned(m, n, dtype), path=path, split_k=split, config=config)
    assert_matches(out, reference(x, qw))


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("weights", ["int4", "int8"])
@pytest.mark.parametrize(("m", "path"), [(16, "gemv"), (1, "gemm"), (5, "gemm"), (33, "dequant")])
def test_every_path_at_any_m(weights: str, m: int, path: str) -> None:
    n, k = 40, 128
    x, qw = make(m, n, k, weights, 64, F16, seed=7 + m)
    config = {"gemv": GEMV_CFG, "gemm": GEMM_CFG, "dequant": None}[path]
    out = run(x, qw, poisoned(m, n, F16), path=path, split_k=2, config=config)
    assert_matches(out, reference(x, qw))


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("weights", "m"), [("int4", 1), ("int4", 33), ("int8", 2), ("int8", 20)])
def test_public_op_runs_the_kernels_interpreted(
    weights: str, m: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Default configs and split-K, as a model would call it; scales in fp16 under bf16 activations too.
    monkeypatch.setattr(qm, "quant_matmul_ref", _forbidden)  # the kernels, not the CPU fallback, must run
    x, qw = make(m, 48, 256, weights, 128, F16, seed=m)
    x = x.to(dtype)
    out = quant_matmul(x, qw)
    assert out.shape == (m, 48) and out.dtype == dtype
    assert_matches(out, reference(x, qw))


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_split_k_with_empty_slices() -> None:
    # 2 K blocks over 5 slices: slices 2..4 own no K block and must still write zeros, not leave NaN.
    x, qw = make(3, 40, 128, "int4", 64, F16, seed=3)
    out = run(x, qw, poisoned(3, 40, F16), path="gemv", split_k=5, config=GEMV_CFG)
    assert_matches(out, reference(x, qw))


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_zero_rows_and_strided_inputs() -> None:
    x, qw = make(6, 40, 128, "int4", 32, F16, seed=5)
    assert run(x[:0], qw).shape == (0, 40)
    xt = x.t().contiguous().t()  # same values, column-major strides
    assert_matches(run(xt, qw, path="gemm", config=GEMM_CFG), reference(x, qw))


@needs_triton
@pytest.mark.usefixtures("interpret")
@pytest.mark.parametrize(("weights", "group"), [("int4", 32), ("int4", 128), ("int8", -1)])
def test_dequantize_kernel_matches_packing(weights: str, group: int) -> None:
    n, k = 40, 256
    _, qw = make(1, n, k, weights, group, F16, seed=11)
    tensors = tuple(t for t in (qw.qweight, qw.scales, qw.zeros) if t is not None)
    w = dequantize_triton(weights, tensors, n, k, group, F16)
    assert torch.equal(w, qw.dequantize(F16))  # fp16: bit-exact
    # bf16: the interpreter truncates fp32 -> bf16 where GPUs round to nearest, so within one bf16 ulp here
    wb = dequantize_triton(weights, tensors, n, k, group, BF16)
    torch.testing.assert_close(wb, qw.dequantize(BF16), rtol=2**-7, atol=0)


# ----------------------------------------------------------------------------- the op: CPU path, registration


@pytest.mark.usefixtures("no_interpret")
@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_cpu_path_is_the_reference(weights: str, dtype: torch.dtype) -> None:
    x, qw = make(5, 48, 128, weights, 32, dtype, seed=1)
    out = quant_matmul(x, qw)
    assert torch.equal(out, quant_matmul_ref(x, qw))
    assert torch.equal(out, F.linear(x, qw.dequantize(dtype)))


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_float32_activations_take_the_dequantize_path() -> None:
    x, qw = make(3, 48, 128, "int4", 64, torch.float32, seed=2)
    torch.testing.assert_close(quant_matmul(x, qw), reference(x, qw))
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        run(x, qw, path="gemv")


@pytest.mark.usefixtures("no_interpret")
@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_custom_op_registration(weights: str) -> None:
    x, qw = make(4, 48, 128, weights, 64, BF16, seed=3)
    args: tuple[object, ...]
    if weights == "int4":
        op, args = torch.ops.qserve.quant_matmul_int4, (x, qw.qweight, qw.scales, qw.zeros, 64)
    else:
        op, args = torch.ops.qserve.quant_matmul_int8, (x, qw.qweight, qw.scales)
    torch.library.opcheck(op, args)


@pytest.mark.usefixtures("no_interpret")
def test_torch_compile_traces_through_the_op() -> None:
    x, qw = make(4, 48, 128, "int4", 64, BF16, seed=4)
    compiled = torch.compile(lambda x: quant_matmul(x, qw) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), quant_matmul(x, qw) * 2)


def test_fake_tensors_give_shapes_and_check_inputs() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, qw = make(4, 48, 128, "int4", 64, BF16, seed=4)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(x)
        out = quant_matmul(fx, qw)
        assert out.shape == (4, 48) and out.dtype == BF16
        with pytest.raises(ValueError, match="K"):
            quant_matmul(mode.from_tensor(x[:, :64]), qw)


# ----------------------------------------------------------------------------- errors


def _int4() -> tuple[torch.Tensor, QuantizedWeight]:
    return make(2, 48, 128, "int4", 64, F16, seed=9)


def _int8() -> tuple[torch.Tensor, QuantizedWeight]:
    return make(2, 48, 128, "int8", -1, F16, seed=9)


def _with(qw: QuantizedWeight, **kw: object) -> QuantizedWeight:
    fields = dict(qw.__dict__)
    fields.update(kw)
    return QuantizedWeight(**fields)  # type: ignore[arg-type]


ERRORS = {
    "x 1-D": (lambda: (_int4()[0][0], _int4()[1]), ValueError, "2-D"),
    "x 3-D": (lambda: (_int4()[0][None], _int4()[1]), ValueError, "2-D"),
    "x int": (lambda: (_int4()[0].to(torch.int32), _int4()[1]), TypeError, "float16, bfloat16 or float32"),
    "K mismatch int4": (lambda: (_int4()[0][:, :64], _int4()[1]), ValueError, "K"),
    "K mismatch int8": (lambda: (_int8()[0][:, :64], _int8()[1]), ValueError, "K"),
    "qweight dtype int4": (
        lambda: (_int4()[0], _with(_int4()[1], qweight=_int4()[1].qweight.to(torch.int8))),
        TypeError,
        "uint8",
    ),
    "qweight dtype int8": (
        lambda: (_int8()[0], _with(_int8()[1], qweight=_int8()[1].qweight.to(torch.uint8))),
        TypeError,
        "int8",
    ),
    "scales dtype": (
        lambda: (_int4()[0], _with(_int4()[1], scales=_int4()[1].scales.to(torch.int32))),
        TypeError,
        "scales",
    ),
    "scales shape int4": (
        lambda: (_int4()[0], _with(_int4()[1], scales=_int4()[1].scales[:, :1])),
        ValueError,
        "scales",
    ),
    "scales shape int8": (
        lambda: (_int8()[0], _with(_int8()[1], scales=_int8()[1].scales[:4])),
        ValueError,
        "scales",
    ),
    "no zeros": (lambda: (_int4()[0], _with(_int4()[1], zeros=None)), ValueError, "zero points"),
    "group size": (lambda: (_int4()[0], _with(_int4()[1], group_size=48)), ValueError, "group size"),
    "devices": (lambda: (_int4()[0].to("meta"), _int4()[1]), ValueError, "device"),
    "unknown format": (lambda: (_int4()[0], _with(_int4()[1], weights="int3")), ValueError, "int4 or int8"),
    "not a QuantizedWeight": (lambda: (_int4()[0], _int4()[1].dequantize()), TypeError, "QuantizedWeight"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_inputs_raise_clear_errors(case: str) -> None:
    build, exc, match = ERRORS[case]
    x, qw = build()  # type: ignore[operator]
    with pytest.raises(exc, match=match):
        quant_matmul(x, qw)


@needs_triton
@pytest.mark.usefixtures("interpret")
def test_bad_launch_options_raise() -> None:
    x, qw = _int4()
    with pytest.raises(ValueError, match="divide the group size"):
        run(x, qw, path="gemm", config=dict(GEMM_CFG, BLOCK_K=128))
    with pytest.raises(ValueError, match="keys"):
        run(x, qw, path="gemv", config=GEMM_CFG)
    with pytest.raises(ValueError, match="path"):
        run(x, qw, path="fast")
    with pytest.raises(ValueError, match="out"):
        run(x, qw, out=torch.empty(2, 47, dtype=F16))


# ----------------------------------------------------------------------------- configs and heuristics


def test_regimes_by_m() -> None:
    assert [choose_path(m) for m in (1, GEMV_MAX_M, GEMV_MAX_M + 1, DEQUANT_MIN_M - 1, DEQUANT_MIN_M)] == [
        "gemv",
        "gemv",
        "gemm",
        "gemm",
        "dequant",
    ]


def test_configs_pruned_by_m_and_group_size() -> None:
    for m in (1, 2, 3, 4):
        kept = prune_configs(gemv_configs(), "gemv", m, 128)
        assert kept and all(c["BLOCK_K"] <= 128 for c in kept)
    assert len(prune_configs(gemv_configs(), "gemv", 4, 128)) < len(
        prune_configs(gemv_configs(), "gemv", 1, 128)
    )
    assert {c["BLOCK_K"] for c in prune_configs(gemv_configs(), "gemv", 1, 32)} == {32}
    for m, lo, hi in [(5, 16, 16), (16, 16, 16), (33, 16, 64), (128, 32, 128), (1000, 64, 128)]:
        kept = prune_configs(gemm_configs(), "gemm", m, 64)
        assert kept and all(lo <= c["BLOCK_M"] <= hi and c["BLOCK_K"] <= 64 for c in kept), (m, kept)
    assert prune_configs(gemm_configs(), "gemm", 1000, -1) != prune_configs(gemm_configs(), "gemm", 1000, 32)


def test_split_k_fills_the_gpu_only_when_needed() -> None:
    assert split_k_for("gemv", 1, 14336, 4096, 132) == 1  # 224 tiles already
    assert split_k_for("gemv", 1, 4096, 4096, 132) == 4
    assert split_k_for("gemv", 1, 4096, 14336, 132) == 4
    assert split_k_for("gemv", 1, 4096, 1024, 132) == 2  # 2 slices of 512
    assert split_k_for("gemv", 1, 4096, 512, 132) == 1  # slices would be shorter than 512
    assert split_k_for("gemm", 16, 4096, 4096, 132) == 8
    assert split_k_for("gemm", 512, 4096, 4096, 132) == 1
    assert split_k_for("gemv", 1, 64, 4096, 1) == 1  # CPU


# ----------------------------------------------------------------------------- GPU

GPU_INT4 = [(m, g, dt) for m in (1, 3, 16, 33, 128, 1024) for g in (32, 64, 128) for dt in (F16, BF16)]


@pytest.fixture
def fixed_configs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("QSERVE_AUTOTUNE", "0")  # the default config per regime: no tuning time in tests
    yield


@pytest.mark.gpu
@needs_triton
@pytest.mark.usefixtures("fixed_configs")
@pytest.mark.parametrize(("m", "group", "dtype"), GPU_INT4)
def test_gpu_int4(m: int, group: int, dtype: torch.dtype) -> None:
    n, k = 2056, 4096  # N not a multiple of any BLOCK_N
    x, qw = make(m, n, k, "int4", group, dtype, seed=m + group, device="cuda")
    out = run(x, qw, poisoned(m, n, dtype, "cuda"))
    assert_matches(out, reference(x, qw))
    assert_matches(quant_matmul(x, qw), reference(x, qw))


@pytest.mark.gpu
@needs_triton
@pytest.mark.usefixtures("fixed_configs")
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 16, 33, 128, 1024])
def test_gpu_int8(m: int, dtype: torch.dtype) -> None:
    n, k = 2056, 4100  # K not a multiple of any BLOCK_K
    x, qw = make(m, n, k, "int8", -1, dtype, seed=m, device="cuda")
    assert_matches(run(x, qw, poisoned(m, n, dtype, "cuda")), reference(x, qw))


@pytest.mark.gpu
@needs_triton
@pytest.mark.usefixtures("fixed_configs")
@pytest.mark.parametrize("weights", ["int4", "int8"])
@pytest.mark.parametrize("split", [1, 2, 3, 8])
@pytest.mark.parametrize(("m", "path"), [(1, "gemv"), (4, "gemv"), (16, "gemm"), (200, "gemm")])
def test_gpu_paths_and_splits(weights: str, split: int, m: int, path: str) -> None:
    x, qw = make(m, 1000, 2048, weights, 128, F16, seed=split, device="cuda")
    assert_matches(run(x, qw, poisoned(m, 1000, F16, "cuda"), path=path, split_k=split), reference(x, qw))


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_gpu_autotuned_and_compiled(weights: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("QSERVE_AUTOTUNE", raising=False)
    for m in (1, 16):
        x, qw = make(m, 4096, 4096, weights, 128, F16, seed=m, device="cuda")
        assert_matches(quant_matmul(x, qw), reference(x, qw))
    compiled = torch.compile(lambda x: quant_matmul(x, qw), fullgraph=True)  # inductor around the custom op
    assert_matches(compiled(x), reference(x, qw))


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(("weights", "group"), [("int4", 32), ("int4", 128), ("int8", -1)])
def test_gpu_dequantize_bit_exact(weights: str, group: int, dtype: torch.dtype) -> None:
    _, qw = make(1, 1000, 4096, weights, group, dtype, seed=1, device="cuda")
    tensors = tuple(t for t in (qw.qweight, qw.scales, qw.zeros) if t is not None)
    assert torch.equal(dequantize_triton(weights, tensors, 1000, 4096, group, dtype), qw.dequantize(dtype))
