"""Tuning of the quantized matmul: constants, autotune candidates and their pruning, split-K, the regime by M.

No triton needed, except by the autotune wrappers at the end, defined only when triton is installed. The
kernels they tune live in :mod:`qserve.kernels.quant_matmul_w4` / ``_w8``; the regimes and the split-K scheme
are described in :mod:`qserve.kernels.quant_matmul`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

try:
    import triton

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dev / gpu extra
    HAS_TRITON = False

# ----------------------------------------------------------------------------- tuning constants

GEMV_MAX_M = 4  # largest M for the GEMV kernel (its BLOCK_M is next_pow2(M) <= 4)
DEQUANT_MIN_M = 1024  # from this M on: dequantize once + torch.matmul (bench/kernels.py measures it)
SPLIT_K_MAX = 8  # at most this many K slices
SPLIT_K_MIN_K = 512  # each K slice keeps at least this many inputs
SPLIT_K_NOMINAL_BLOCK_N = 64  # tile width split_k_for assumes (the autotuned one may differ)
SPLIT_K_NOMINAL_BLOCK_M = 16
INT4_GEMM_MAX_BLOCK_M = 64  # the int4 GEMM holds two (BLOCK_M, BLOCK_N) fp32 tiles: at 128 rows ptxas spills
MAX_ELEMENTS = 2**31  # int32 offsets inside the kernels
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_ACTS = (torch.float16, torch.bfloat16)

Config = dict[str, int]  # BLOCK_* meta-parameters plus num_warps / num_stages


# ----------------------------------------------------------------------------- configs


def gemv_configs() -> list[Config]:
    """GEMV candidates (BLOCK_N x BLOCK_K tiles); the first that survives pruning is the untuned default."""
    shapes = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
        (32, 128, 4, 3),
        (64, 128, 4, 3),
        (16, 128, 2, 4),
        (128, 128, 8, 3),
        (32, 256, 4, 3),
        (64, 64, 8, 3),
        (32, 64, 4, 3),
        (16, 64, 2, 4),
    ]
    return [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for n, k, w, s in shapes]


def gemm_configs() -> list[Config]:
    """GEMM candidates (BLOCK_M x BLOCK_N x BLOCK_K tiles); pruned by M, so each M bucket has its own default."""
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (16, 64, 128, 4, 2),  # 4 stages spill on sm_90 once BLOCK_K shrinks to 64 (int4, group 64)
        (16, 128, 128, 4, 4),
        (32, 64, 128, 4, 4),
        (32, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 128, 128, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 256, 32, 8, 3),  # BLOCK_K 64 spills 88-220 B on sm_80 (python -m qserve.kernels.aot)
    ]
    return [
        dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def prune_configs(configs: list[Config], path: str, m: int, group_size: int) -> list[Config]:
    """Keep the configs that suit ``path`` ("gemv" | "gemm") at M = ``m``, in order, without duplicates.

    int4 (``group_size`` > 0): BLOCK_K shrinks to a power of two dividing the group size, so every K slice
    lies inside one group. GEMV: the (BLOCK_M, BLOCK_N, BLOCK_K) product must fit about 64 float32
    registers a thread. GEMM: BLOCK_M between a quarter of next_pow2(M) (at most 64) and next_pow2(M), and
    for int4 at most INT4_GEMM_MAX_BLOCK_M.
    """
    out: list[Config] = []
    bucket = _m_bucket(m)
    for cfg in configs:
        c = dict(cfg)
        if group_size > 0:
            c["BLOCK_K"] = _pow2_divisor(group_size, c["BLOCK_K"])
        if path == "gemv":
            if _next_pow2(m) * c["BLOCK_N"] * c["BLOCK_K"] > 64 * 32 * c["num_warps"]:
                continue
        elif not (min(64, max(16, bucket // 4)) <= c["BLOCK_M"] <= max(16, bucket)):
            continue
        elif group_size > 0 and c["BLOCK_M"] > INT4_GEMM_MAX_BLOCK_M:
            continue  # python -m qserve.kernels.aot: 140-800 B of spills on sm_80 and sm_90
        if c not in out:
            out.append(c)
    if not out:  # nothing fits: the smallest tile
        smallest: Config = min(configs, key=_tile_volume).copy()
        if group_size > 0:
            smallest["BLOCK_K"] = _pow2_divisor(group_size, smallest["BLOCK_K"])
        out.append(smallest)
    return out


def _tile_volume(cfg: Config) -> int:
    return cfg.get("BLOCK_M", 1) * cfg["BLOCK_N"] * cfg["BLOCK_K"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _m_bucket(m: int) -> int:
    return min(_next_pow2(m), 4096)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_k_for(path: str, m: int, n: int, k: int, num_sms: int) -> int:
    """How many K slices to launch: double while the nominal tile count is below one per SM.

    Stops at SPLIT_K_MAX, or when a slice would cover fewer than SPLIT_K_MIN_K inputs.
    """
    if path == "gemv":
        tiles = _cdiv(n, SPLIT_K_NOMINAL_BLOCK_N)
    else:
        tiles = _cdiv(m, SPLIT_K_NOMINAL_BLOCK_M) * _cdiv(n, 2 * SPLIT_K_NOMINAL_BLOCK_N)
    split = 1
    while split < SPLIT_K_MAX and tiles * split < num_sms and k // (2 * split) >= SPLIT_K_MIN_K:
        split *= 2
    return split


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def choose_path(m: int) -> str:
    """The regime for a batch of ``m`` rows: "gemv", "gemm" or "dequant" (see the module docstring)."""
    if m <= GEMV_MAX_M:
        return "gemv"
    return "gemm" if m < DEQUANT_MIN_M else "dequant"


# ----------------------------------------------------------------------------- autotuning

if HAS_TRITON:

    def _autotuned(kernel: Any, candidates: list[Config], key: list[str]) -> Any:
        """``kernel`` autotuned over ``candidates`` (pruned per call by :func:`_prune_hook`), brief timings."""
        configs = [_to_triton_config(c) for c in candidates]
        prune = {"early_config_prune": _prune_hook}
        import triton.testing

        try:
            bench = functools.partial(triton.testing.do_bench, warmup=5, rep=20)
            return triton.autotune(configs, key=key, prune_configs_by=prune, do_bench=bench)(kernel)
        except TypeError:  # older triton: no do_bench argument
            return triton.autotune(configs, key=key, prune_configs_by=prune, warmup=5, rep=20)(kernel)

    def _to_triton_config(c: Config) -> Any:
        meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
        return triton.Config(meta, num_warps=c["num_warps"], num_stages=c["num_stages"])

    def _prune_hook(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
        args = {**named_args, **kwargs}
        path = "gemv" if "M_BUCKET" not in args else "gemm"
        m = args["BLOCK_M"] if path == "gemv" else args["M_BUCKET"]
        plain = [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]
        return [_to_triton_config(c) for c in prune_configs(plain, path, m, args.get("GROUP_SIZE", 0))]
