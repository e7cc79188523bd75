"""bitsandbytes 4-bit (NF4 / FP4) weights: the layout, the pure-torch reference, and the Triton matmul launcher.

``C = x @ dequant_bnb(W)^T`` with W (N, K) stored as bitsandbytes stores it (a ``Params4bit`` and its
``QuantState``; the Triton kernel is :mod:`qserve.kernels.bnb4_matmul_triton`):

* ``packed`` uint8 (ceil(N K / 2),): W flattened row-major, two codes per byte, element ``2i`` in the high
  nibble (bitsandbytes keeps it as a (ceil(N K / 2), 1) tensor; any shape with that many bytes is read flat);
* ``code`` float32 (16,): the codebook (NF4: normal-float quantiles; FP4: a 1-2-1 float), indexed by the code;
* ``absmax`` float32 (ceil(N K / blocksize),): one scale per block of ``blocksize`` flat elements (64 by
  default; blocks may span rows);
* double quantization: ``absmax`` is uint8 (same length), ``absmax_f32[b] = nested_code[absmax[b]] *
  nested_absmax[b // nested_blocksize] + offset`` (``nested_code`` float32 (256,), bitsandbytes' dynamic map;
  ``nested_blocksize`` 256; ``offset`` the mean absmax that was subtracted before quantizing).

``W[n, k] = code[q(f)] * absmax_f32[f // blocksize]`` with ``f = n K + k``, computed in float32 and rounded
once to the activation dtype, as ``bitsandbytes.functional.dequantize_4bit`` returns it.

:func:`bnb4_matmul` is the public op (``qserve::bnb4_matmul``, so models stay ``torch.compile``-able): the
Triton kernel on CUDA (or anywhere under ``TRITON_INTERPRET=1``), the reference elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qserve.kernels.quant_matmul_configs import HAS_TRITON, Config, _cdiv
from qserve.kernels.quant_matmul_launch import _alloc, _call, _dot_dtype, _interpreting

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Bnb4Weight:
    """One bitsandbytes 4-bit weight (module docstring); ``shape`` is (N, K) of the unpacked weight."""

    packed: Tensor
    code: Tensor
    absmax: Tensor
    blocksize: int
    shape: tuple[int, int]
    nested_code: Tensor | None = None
    nested_absmax: Tensor | None = None
    nested_blocksize: int = 256
    offset: float = 0.0

    @property
    def nested(self) -> bool:
        return self.nested_code is not None

    @classmethod
    def from_quant_state(cls, packed: Tensor, qs: Any) -> Bnb4Weight:
        """From a bitsandbytes ``Params4bit``'s data and its ``QuantState`` (no copy; bitsandbytes not imported)."""
        n, k = (int(d) for d in qs.shape)
        s2 = qs.state2 if qs.nested else None
        absmax = qs.absmax.reshape(-1)  # bitsandbytes' CPU re-pack leaves it bf16: the kernel reads float32
        return cls(
            packed.reshape(-1),
            qs.code.float(),
            absmax if s2 is not None else absmax.float(),
            int(qs.blocksize),
            (n, k),
            None if s2 is None else s2.code.float(),
            None if s2 is None else s2.absmax.float().reshape(-1),
            256 if s2 is None else int(s2.blocksize),
            float(qs.offset) if s2 is not None else 0.0,
        )


# ----------------------------------------------------------------------------- reference


def absmax_f32(w: Bnb4Weight) -> Tensor:
    """float32 (num_blocks,): the per-block absmax, undoing the double quantization if there is one."""
    if w.nested_code is None or w.nested_absmax is None:
        return w.absmax.float()
    b = torch.arange(w.absmax.numel(), device=w.absmax.device) // w.nested_blocksize
    return w.nested_code[w.absmax.long()] * w.nested_absmax[b] + w.offset


def dequantize_bnb4_ref(w: Bnb4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N, K) weight in ``dtype``: float32 ``code[q] * absmax`` rounded once."""
    n, k = w.shape
    flat = w.packed.reshape(-1)
    q = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[: n * k].long()  # (N K,): high nibble first
    blocks = torch.arange(n * k, device=flat.device) // w.blocksize
    return (w.code.float()[q] * absmax_f32(w)[blocks]).to(dtype).view(n, k)


def bnb4_matmul_ref(x: Tensor, w: Bnb4Weight) -> Tensor:
    """x (M, K) @ dequant(W)^T -> (M, N) in x's dtype, with the weight rounded to x's dtype first."""
    return (x.float() @ dequantize_bnb4_ref(w, x.dtype).float().t()).to(x.dtype)


# ----------------------------------------------------------------------------- checks and configs


def check_bnb4(x: Tensor, w: Bnb4Weight) -> None:
    """Raise ValueError, naming the problem, unless x (M, K) and ``w`` can go to the kernel."""
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"bnb4 matmul: x must be (M, {k}), got {tuple(x.shape)}")
    if k % 2:
        raise ValueError(f"bnb4 matmul: in_features must be even (rows start on a byte), got {k}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"bnb4 matmul: x must be float16, bfloat16 or float32, got {x.dtype}")
    if w.blocksize <= 0 or w.nested_blocksize <= 0:
        raise ValueError(f"bnb4 matmul: bad blocksize {w.blocksize} / {w.nested_blocksize}")
    blocks = _cdiv(n * k, w.blocksize)
    want: list[tuple[str, Tensor | None, torch.dtype, int]] = [
        ("packed", w.packed, torch.uint8, _cdiv(n * k, 2)),
        ("code", w.code, torch.float32, 16),
        ("absmax", w.absmax, torch.uint8 if w.nested else torch.float32, blocks),
    ]
    if w.nested:
        want += [
            ("nested_code", w.nested_code, torch.float32, 256),
            ("nested_absmax", w.nested_absmax, torch.float32, _cdiv(blocks, w.nested_blocksize)),
        ]
    elif w.nested_absmax is not None:
        raise ValueError("bnb4 matmul: nested_absmax without nested_code")
    for name, t, dtype, numel in want:
        assert t is not None
        if t.dtype != dtype or t.numel() != numel:
            raise ValueError(
                f"bnb4 matmul: {name} must be {dtype} with {numel} elements, got {t.dtype} {t.numel()}"
            )
        if t.device != x.device:
            raise ValueError(f"bnb4 matmul: {name} is on {t.device}, x on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"bnb4 matmul: {name} must be contiguous")


def bnb4_configs() -> list[Config]:
    """Launch configs, smallest BLOCK_M first; :func:`choose_config` picks by M. (Tuned on a GPU later.)"""
    return [
        {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2},
    ]


def choose_config(m: int, k: int, blocksize: int, dtype: torch.dtype, nested: bool) -> Config:
    """The config for M rows. BLOCK_K drops to 32 where the ahead-of-time check found spills at 64 (sm_80 /
    sm_90): blocks spanning rows (absmax gathered per element), and float32 activations with double
    quantization."""
    configs = bnb4_configs()
    cfg = next((c for c in configs if m <= c["BLOCK_M"]), configs[-1]).copy()
    if k % blocksize or blocksize % cfg["BLOCK_K"] or (dtype == torch.float32 and nested):
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 32)
    return cfg


# ----------------------------------------------------------------------------- launch


def bnb4_matmul_triton(x: Tensor, w: Bnb4Weight, config: Config | None = None) -> Tensor:
    """x (M, K) @ dequant_bnb(W)^T -> (M, N) in x's dtype, by the Triton kernel (CUDA or the interpreter).

    Raises:
        RuntimeError: triton is not installed.
        ValueError: shapes, dtypes, devices or sizes that do not match (:func:`check_bnb4`), or a config
            whose BLOCK_K is not a power of two >= 16.
    """
    if not HAS_TRITON:
        raise RuntimeError("the bnb4 Triton kernel needs triton installed (pip install 'qserve[gpu]')")
    check_bnb4(x, w)
    m, (n, k) = x.shape[0], w.shape
    cfg = dict(config) if config is not None else choose_config(m, k, w.blocksize, x.dtype, w.nested)
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        if cfg[key] < 16 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"bnb4 matmul: {key} must be a power of two >= 16, got {cfg[key]}")
    out = _alloc((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    from qserve.kernels.bnb4_matmul_triton import _bnb4_gemm_kernel

    code2 = w.nested_code if w.nested_code is not None else w.code  # unread when not NESTED
    absmax2 = w.nested_absmax if w.nested_absmax is not None else w.code
    args: list[Any] = [
        x, w.packed, w.code, w.absmax, code2, absmax2, out,
        m, n, k, w.blocksize, w.nested_blocksize, w.offset,
        *x.stride(), *out.stride(),
    ]  # fmt: skip
    meta = {
        "NESTED": w.nested,
        "ROW_ALIGNED": k % w.blocksize == 0 and w.blocksize % cfg["BLOCK_K"] == 0,
        "DOT_DTYPE": _dot_dtype(x) if x.dtype != torch.float32 else _f32(),
        **cfg,
    }
    grid = (_cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"]),)
    _call(_bnb4_gemm_kernel, grid, args, meta)
    return out


def _f32() -> Any:
    import triton.language as tl

    return tl.float32


# ----------------------------------------------------------------------------- the public op


def _use_triton(x: Tensor) -> bool:
    return HAS_TRITON and (_interpreting() or x.device.type == "cuda")


@torch.library.custom_op("qserve::bnb4_matmul", mutates_args=())
def _bnb4_op(
    x: Tensor,
    packed: Tensor,
    code: Tensor,
    absmax: Tensor,
    nested_code: Tensor | None,
    nested_absmax: Tensor | None,
    n: int,
    k: int,
    blocksize: int,
    nested_blocksize: int,
    offset: float,
) -> Tensor:
    w = Bnb4Weight(
        packed, code, absmax, blocksize, (n, k), nested_code, nested_absmax, nested_blocksize, offset
    )
    if _use_triton(x):
        return bnb4_matmul_triton(x, w)
    check_bnb4(x, w)
    return bnb4_matmul_ref(x, w)


@_bnb4_op.register_fake
def _(
    x: Tensor,
    packed: Tensor,
    code: Tensor,
    absmax: Tensor,
    nested_code: Tensor | None,
    nested_absmax: Tensor | None,
    n: int,
    k: int,
    blocksize: int,
    nested_blocksize: int,
    offset: float,
) -> Tensor:
    return x.new_empty((x.shape[0], n))


def bnb4_matmul(x: Tensor, w: Bnb4Weight) -> Tensor:
    """x (..., K) @ dequant_bnb(W)^T -> (..., N) in x's dtype (Triton on CUDA, the reference elsewhere)."""
    n, k = w.shape
    x2 = x.reshape(-1, k)  # (M, K)
    y = _bnb4_op(x2, w.packed, w.code, w.absmax, w.nested_code, w.nested_absmax, n, k, w.blocksize,
                 w.nested_blocksize, w.offset)  # fmt: skip
    return y.reshape(*x.shape[:-1], n)
