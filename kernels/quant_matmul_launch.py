"""Launching the quantized-matmul Triton kernels: path and config choice, split-K workspaces, the interpreter.

:func:`matmul_int4_triton` / :func:`matmul_int8_triton` are the Triton paths of
:func:`qserve.kernels.quant_matmul.quant_matmul` with their knobs exposed (tests, benchmarks);
:func:`dequantize_triton` writes the float weight of the dequant path; ``_run`` is the launcher the custom ops
share. With ``TRITON_INTERPRET=1`` every launch runs in Triton's interpreter, whichever mode triton was
imported in.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from qserve.kernels.quant_matmul_checks import _check_int4, _check_int8, _name
from qserve.kernels.quant_matmul_configs import (
    _TRITON_ACTS,
    HAS_TRITON,
    Config,
    _cdiv,
    _m_bucket,
    _next_pow2,
    _num_sms,
    choose_path,
    gemm_configs,
    gemv_configs,
    prune_configs,
    split_k_for,
)

if HAS_TRITON:
    import triton.language as tl

    from qserve.kernels.quant_matmul_common import _dequant_kernel, _splitk_reduce_kernel
    from qserve.kernels.quant_matmul_configs import _autotuned
    from qserve.kernels.quant_matmul_w4 import _w4_gemm_kernel, _w4_gemv_kernel
    from qserve.kernels.quant_matmul_w8 import _w8_gemm_kernel, _w8_gemv_kernel

    _W4_GEMV = _autotuned(_w4_gemv_kernel, gemv_configs(), ["BLOCK_M", "N", "K", "GROUP_SIZE", "SPLIT_K"])
    _W4_GEMM = _autotuned(_w4_gemm_kernel, gemm_configs(), ["M_BUCKET", "N", "K", "GROUP_SIZE", "SPLIT_K"])
    _W8_GEMV = _autotuned(_w8_gemv_kernel, gemv_configs(), ["BLOCK_M", "N", "K", "SPLIT_K"])
    _W8_GEMM = _autotuned(_w8_gemm_kernel, gemm_configs(), ["M_BUCKET", "N", "K", "SPLIT_K"])


# ----------------------------------------------------------------------------- launching


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _autotuning() -> bool:
    return os.environ.get("QSERVE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


@functools.cache
def _interpreted(kernel: Any) -> Any:
    """The interpreter's version of a kernel, whichever mode triton was imported in."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(kernel.fn)


@contextlib.contextmanager
def _interpreter_stdlib() -> Iterator[None]:
    """Let interpreted kernels call ``tl.sum`` even if triton was imported before TRITON_INTERPRET was set.

    Triton's standard library functions (``tl.sum``) are themselves @triton.jit functions, compiled-mode
    objects when triton was imported without TRITON_INTERPRET=1 (e.g. by another module first), and the
    interpreter cannot call those. Swap in interpreted copies for the duration of the launch.
    """
    from triton.runtime.jit import JITFunction

    saved = {}
    for name in ("sum",):
        fn = getattr(tl, name)
        if isinstance(fn, JITFunction):
            saved[name] = fn
            setattr(tl, name, _interpreted(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(tl, name, fn)


def _launch(
    tuned: Any,
    kernel: Any,
    grid: Callable[[dict[str, Any]], tuple[int, ...]],
    config: Config | None,
    args: list[Any],
    meta: dict[str, Any],
    path: str,
    m: int,
    group_size: int,
) -> None:
    """Run ``kernel`` with an explicit config, the default one (interpreter, QSERVE_AUTOTUNE=0), or autotuned."""
    if config is None and not _interpreting() and _autotuning():
        tuned[grid](*args, **meta)
        return
    cfg = (
        config or prune_configs(gemv_configs() if path == "gemv" else gemm_configs(), path, m, group_size)[0]
    )
    _call(kernel, grid, args, {**meta, **cfg})


def _dot_dtype(x: Tensor) -> Any:
    # The interpreter (numpy) has no bfloat16 matmul: there, bf16 dots run on float32 copies, exactly.
    if _interpreting() and x.dtype == torch.bfloat16:
        return tl.float32
    return tl.float16 if x.dtype == torch.float16 else tl.bfloat16


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    # Under the interpreter (tests) buffers start as NaN, so an element no program writes cannot pass.
    if _interpreting():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _check_config(config: Config | None, path: str, group_size: int) -> None:
    if config is None:
        return
    need = {"BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} | (
        {"BLOCK_M", "GROUP_M"} if path == "gemm" else set()
    )
    if set(config) != need:
        raise ValueError(f"{path} config needs exactly the keys {sorted(need)}, got {sorted(config)}")
    if group_size > 0 and group_size % config["BLOCK_K"]:
        raise ValueError(f"BLOCK_K {config['BLOCK_K']} must divide the group size {group_size}")
    if path == "gemm" and min(config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]) < 16:
        raise ValueError(f"tl.dot needs BLOCK_M, BLOCK_N, BLOCK_K >= 16, got {config}")


def _run(
    weights: str,
    x: Tensor,
    tensors: tuple[Tensor, ...],
    n: int,
    group_size: int,
    path: str,
    split_k: int | None,
    config: Config | None,
    out: Tensor | None,
) -> Tensor:
    """Shared launcher of the int4 / int8 Triton paths (inputs already validated)."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton path needs triton installed (pip install 'qserve[gpu]')")
    m, k = x.shape
    if out is None:
        out = _alloc((m, n), x.dtype, x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} ({m}, {n}) tensor on {x.device}")
    if m == 0:
        return out
    if path == "auto":
        path = choose_path(m)
        if x.dtype not in _TRITON_ACTS or (weights == "int4" and group_size % 16):
            path = "dequant"  # float32 activations; tiles need 16 | group size, dequantizing takes any
    elif path != "dequant" and x.dtype not in _TRITON_ACTS:
        raise TypeError(f"the {path} kernel takes float16 or bfloat16 activations, got {_name(x.dtype)}")
    if path == "dequant":
        w = dequantize_triton(weights, tensors, n, k, group_size, x.dtype)  # (N, K)
        return torch.matmul(x, w.t(), out=out)
    if path not in ("gemv", "gemm"):
        raise ValueError(f"path must be auto, gemv, gemm or dequant, got {path!r}")
    _check_config(config, path, group_size)
    split = split_k or split_k_for(path, m, n, k, _num_sms(x.device))
    if split < 1:
        raise ValueError(f"split_k must be >= 1, got {split}")
    c = out if split == 1 else _alloc((split, m, n), torch.float32, x.device)  # (S, M, N) partials
    c_strides = (0, *out.stride()) if split == 1 else c.stride()
    if weights == "int4":
        qweight, scales, zeros = tensors
        w_args = [qweight, scales, zeros]
        sizes = [m, n, k, group_size, split]
        w_strides = [*qweight.stride(), *scales.stride(), *zeros.stride()]
    else:
        qweight, scales = tensors
        w_args = [qweight, scales]
        sizes = [m, n, k, split]
        w_strides = [*qweight.stride(), scales.stride(0)]
    meta: dict[str, Any] = {}
    if path == "gemv":
        meta["BLOCK_M"] = _next_pow2(m)
        args = [x, *w_args, c, *sizes, *x.stride(), *w_strides, *c_strides]
        kernel, tuned = (_w4_gemv_kernel, _W4_GEMV) if weights == "int4" else (_w8_gemv_kernel, _W8_GEMV)

        def grid(meta: dict[str, Any]) -> tuple[int, ...]:
            return (_cdiv(n, meta["BLOCK_N"]), split)
    else:
        meta["DOT_DTYPE"] = _dot_dtype(x)
        args = [x, *w_args, c, *sizes, _m_bucket(m), *x.stride(), *w_strides, *c_strides]
        kernel, tuned = (_w4_gemm_kernel, _W4_GEMM) if weights == "int4" else (_w8_gemm_kernel, _W8_GEMM)

        def grid(meta: dict[str, Any]) -> tuple[int, ...]:
            return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]), split)

    _launch(tuned, kernel, grid, config, args, meta, path, m, group_size if weights == "int4" else 0)
    if split > 1:  # sum the partials in slice order
        block = 1024
        _call(
            _splitk_reduce_kernel,
            (_cdiv(m * n, block),),
            [c, out, m * n, split],
            dict(BLOCK=block, num_warps=4),
        )
    return out


def _call(kernel: Any, grid: Any, args: list[Any], meta: dict[str, Any]) -> None:
    """Launch a kernel with fixed meta-parameters, in the interpreter when TRITON_INTERPRET=1."""
    if _interpreting():
        with _interpreter_stdlib():
            _interpreted(kernel)[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def dequantize_triton(
    weights: str, tensors: tuple[Tensor, ...], n: int, k: int, group_size: int, dtype: torch.dtype
) -> Tensor:
    """The (N, K) float weight in ``dtype``, by one Triton kernel; bit-exact with QuantizedWeight.dequantize.

    ``tensors`` is (qweight, scales, zeros) for int4 and (qweight, scales) for int8.
    """
    if not HAS_TRITON:
        raise RuntimeError("the Triton path needs triton installed (pip install 'qserve[gpu]')")
    qweight, scales = tensors[0], tensors[1]
    zeros = tensors[2] if weights == "int4" else qweight
    w = _alloc((n, k), dtype, qweight.device)
    if n == 0 or k == 0:
        return w
    bits = 4 if weights == "int4" else 8
    sg = scales.stride(1) if bits == 4 else 0
    zn, zg = zeros.stride() if bits == 4 else (0, 0)
    sizes = [n, k, max(group_size, 1)]
    args = [qweight, scales, zeros, w, *sizes, *qweight.stride(), scales.stride(0), sg, zn, zg, *w.stride()]
    _call(_dequant_kernel, (_cdiv(n, 32), _cdiv(k, 128)), args, dict(W_BITS=bits, BLOCK_N=32, BLOCK_K=128))
    return w


def matmul_int4_triton(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    *,
    path: str = "auto",
    split_k: int | None = None,
    config: Config | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The int4 Triton path of :func:`quant_matmul` with its knobs exposed (tests, benchmarks).

    ``path``: "auto" (by M), "gemv", "gemm" or "dequant"; ``split_k``: K slices (None: :func:`split_k_for`);
    ``config``: explicit meta-parameters instead of autotuning (keys of :func:`gemv_configs` /
    :func:`gemm_configs` entries); ``out``: a contiguous (M, N) tensor of x's dtype to write into.
    """
    _check_int4(x, qweight, scales, zeros, group_size)
    return _run("int4", x, (qweight, scales, zeros), qweight.shape[0], group_size, path, split_k, config, out)


def matmul_int8_triton(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    *,
    path: str = "auto",
    split_k: int | None = None,
    config: Config | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The int8 Triton path of :func:`quant_matmul`; knobs as in :func:`matmul_int4_triton`."""
    _check_int8(x, qweight, scales)
    return _run("int8", x, (qweight, scales), qweight.shape[0], -1, path, split_k, config, out)
