"""Every launch the runtime can make of qserve's Triton kernels, captured from the real launchers, for
:mod:`qserve.kernels.aot`.

Nothing runs: :func:`capture` swaps ``JITFunction.run`` for a recorder, then the launchers of
``quant_matmul_launch`` and ``paged_attention_{store,decode,prefill}`` are called on small, empty CPU tensors
whose shapes specialise like the real ones (sizes and strides divisible by 16, unit inner strides). So the
arguments, constexprs and meta-parameters are those a GPU launch would pass, including the kernels the
launchers chain (split-K reduction, decode split reduction).

Axes (``full=False`` is what ``make test`` compiles; ``full=True`` the whole cross product):

* quantized matmul: int4 / int8 x gemv / gemm x every autotune config the runtime's pruning can keep (by M
  and, for int4, group size 32 / 64 / 128 / 256), with BLOCK_M 1 / 2 / 4 for the GEMV; activations fp16 / bf16
  x scales fp16 / bf16 / fp32 x output in x's dtype (one K slice) or fp32 partials (split-K). CI: every config
  with each activation dtype (scales of the same dtype, no split), and every other dtype pair with the first
  config; full: every config with every dtype combination. The dequantize kernel: every bits x dtype pair.
* fused MoE: float / int8 / int4 (group 128; full: 32 / 64) experts x fp16 / bf16 activations, both GEMMs.
* bitsandbytes NF4 / FP4 matmul: every config x fp16 / bf16 / fp32 activations x double quantization or
  not x absmax per row (K % 64 == 0) or per element (blocks spanning rows).
* paged attention (launch parameters: ``default_config``, there is no autotuner): head_dim 64 / 128 / 256
  (full: 16 and 32 too), float / int8 / int4 cache, q fp16 / bf16 / fp32 (float caches of q's dtype; full:
  any float cache dtype), decode with and without the context split, GQA 4 and block size 16 (full: GQA
  1 / 8, sliding window, block size 32).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from triton.runtime.jit import JITFunction

from qserve.kernels import paged_attention_decode as decode
from qserve.kernels import paged_attention_prefill as prefill
from qserve.kernels import paged_attention_store as store
from qserve.kernels import quant_matmul_launch as qml
from qserve.kernels.kv_quant import block_bytes
from qserve.kernels.paged_attention import default_config
from qserve.kernels.quant_matmul_configs import Config, gemm_configs, gemv_configs, prune_configs

ACTS = (torch.float16, torch.bfloat16)  # activations the Triton matmul paths take
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
INT4_GROUPS = (32, 64, 128, 256)  # 256: AWQ / GPTQ imports
GEMV_MS = (1, 2, 3)  # BLOCK_M 1, 2, 4 (M = 1 specialises to a constant; 3 and 4 do not differ)
GEMM_PRUNE_MS = (5, 8, 16, 32, 64, 128, 256, 512, 1023)  # one M per bucket the GEMM prunes by
MM_K, MM_N = 4096, 1024  # Llama-like: K, N, K / group and strides all divisible by 16


@dataclass
class Launch:
    """One captured kernel launch: the JIT function, its positional arguments and keyword meta."""

    fn: JITFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    label: str = ""  # what the enumerator varied (M, split, GQA ...)

    @property
    def name(self) -> str:
        return str(self.fn.__name__)


@dataclass
class _Recorder:
    launches: list[Launch] = field(default_factory=list)
    label: str = ""


@contextlib.contextmanager
def capture() -> Iterator[_Recorder]:
    """Record every ``kernel[grid](...)`` made inside the block instead of compiling or launching it."""
    rec = _Recorder()
    saved = JITFunction.run

    def record(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        rec.launches.append(Launch(self, args, dict(kwargs), rec.label))

    JITFunction.run = record  # type: ignore[method-assign]
    try:
        yield rec
    finally:
        JITFunction.run = saved  # type: ignore[method-assign]


def _e(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype)


# ----------------------------------------------------------------------------- quantized matmul


def _matmul_configs(weights: str, path: str, m: int) -> list[tuple[Config, int]]:
    """(config, a group size it is valid for): the union of what pruning keeps over groups (and M buckets)."""
    base = gemv_configs() if path == "gemv" else gemm_configs()
    groups = INT4_GROUPS if weights == "int4" else (0,)
    ms = (m,) if path == "gemv" else GEMM_PRUNE_MS
    out: list[tuple[Config, int]] = []
    for g, pm in itertools.product(groups, ms):
        for cfg in prune_configs(base, path, pm, g):
            if all(cfg != c for c, _ in out):
                out.append((cfg, g))
    return out


def _matmul(weights: str, x: torch.Tensor, sdt: torch.dtype, group: int, **kw: Any) -> None:
    k = x.shape[1]
    if weights == "int4":
        qw, z = _e(MM_N, k // 2, dtype=torch.uint8), _e(MM_N, k // group, dtype=torch.uint8)
        qml.matmul_int4_triton(x, qw, _e(MM_N, k // group, dtype=sdt), z, group, **kw)
    else:
        qml.matmul_int8_triton(x, _e(MM_N, k, dtype=torch.int8), _e(MM_N, dtype=sdt), **kw)


def _matmul_launches(rec: _Recorder, full: bool) -> None:
    for weights, path in itertools.product(("int4", "int8"), ("gemv", "gemm")):
        for m in GEMV_MS if path == "gemv" else (16,):
            for i, (cfg, g) in enumerate(_matmul_configs(weights, path, m)):
                group = g if weights == "int4" else -1
                for xdt, sdt, split in itertools.product(ACTS, FLOATS, (1, 2)):
                    if not full and (sdt, split) != (xdt, 1) and i > 0:
                        continue  # CI: other dtype pairs with the first config only
                    rec.label = f"{weights} {path} M={m} split_k={split} group={group}"
                    x = _e(m, MM_K, dtype=xdt)
                    _matmul(weights, x, sdt, group if weights == "int4" else 128, path=path,
                            split_k=split, config=cfg)  # fmt: skip
    for bits, wdt, sdt in itertools.product((4, 8), FLOATS, FLOATS):  # the dequant path (any M, fp32 x)
        rec.label = f"dequant int{bits}"
        n, k, g = MM_N, MM_K, 128
        if bits == 4:
            t = (_e(n, k // 2, dtype=torch.uint8), _e(n, k // g, dtype=sdt), _e(n, k // g, dtype=torch.uint8))
            qml.dequantize_triton("int4", t, n, k, g, wdt)
        else:
            qml.dequantize_triton("int8", (_e(n, k, dtype=torch.int8), _e(n, dtype=sdt)), n, k, -1, wdt)


# ----------------------------------------------------------------------------- paged attention


def _cache(hkv: int, blocks: int, bs: int, d: int, bits: int, cdt: torch.dtype) -> torch.Tensor:
    if bits == 0:
        return _e(2, hkv, blocks, bs, d, dtype=cdt)  # (2, Hkv, num_blocks, block_size, D)
    return _e(2, hkv, blocks, block_bytes(bs, d, bits), dtype=torch.uint8)  # (2, Hkv, num_blocks, bytes)


def _attention_launches(rec: _Recorder, full: bool) -> None:
    dims = (16, 32, 64, 128, 256) if full else (64, 128, 256)
    groups = (1, 4, 8) if full else (4,)
    windows = (None, 256) if full else (None,)
    block_sizes = (16, 32) if full else (16,)
    hkv, batch, blocks, tokens = 8, 16, 64, 64
    for d, bits, qdt in itertools.product(dims, (0, 8, 4), FLOATS):
        if bits == 4 and d < 32:
            continue  # the kernels need head_dim >= 32 for int4
        cache_dts = (FLOATS if full else (qdt,)) if bits == 0 else (torch.uint8,)
        cfg = default_config(d, bits)
        assert cfg.decode_block_n and cfg.prefill_block_m and cfg.prefill_block_n
        assert cfg.num_warps and cfg.num_stages
        for cdt, bs, group, window in itertools.product(cache_dts, block_sizes, groups, windows):
            cache = _cache(hkv, blocks, bs, d, bits, cdt)
            tables = _e(batch, blocks, dtype=torch.int32)
            lens = _e(batch, dtype=torch.int32)
            q, out = _e(batch, hkv * group, d, dtype=qdt), _e(batch, hkv * group, d, dtype=qdt)
            tag = f"head_dim={d} bits={bits} block_size={bs} gqa={group} window={window}"
            for splits in (1, 2):
                rec.label = f"decode {tag} splits={splits}"
                decode.launch_decode(q, out, cache, tables, lens, d**-0.5, window, bs, bits, 256, splits,
                                     cfg.decode_block_n, cfg.num_warps, cfg.num_stages)  # fmt: skip
            rec.label = f"prefill {tag}"
            qsl = _e(batch + 1, dtype=torch.int32)
            qp, outp = _e(tokens, hkv * group, d, dtype=qdt), _e(tokens, hkv * group, d, dtype=qdt)
            prefill.launch_prefill(qp, outp, cache, tables, lens, qsl, d**-0.5, window, bs, bits,
                                   cfg.prefill_block_m, cfg.prefill_block_n, cfg.num_warps,
                                   cfg.num_stages)  # fmt: skip
            if group == groups[0] and window is None:  # the store sees neither GQA nor the window
                rec.label = f"store head_dim={d} bits={bits} block_size={bs}"
                kv = _e(tokens, hkv, d, dtype=qdt)
                store.launch_store_kv(kv, kv, cache, _e(tokens, dtype=torch.int64), bs, bits)


def _moe_launches(rec: _Recorder, full: bool) -> None:
    """The fused-MoE grouped GEMM (gate/up, then down with the routing weight) for float / int8 / int4
    experts (int4 at group 128; full: 32 / 64 too) x fp16 / bf16 activations; quantized experts with scales
    in the activation dtype (what `qserve convert` writes for a checkpoint of that dtype) and in float32."""
    from qserve.kernels.fused_moe import fused_moe_triton
    from qserve.kernels.packing import quantize

    t, e, top_k, h, inter = 16, 8, 2, 256, 128
    ids = torch.arange(t * top_k).view(t, top_k) % e  # (T, K): every expert gets rows
    weights = torch.full((t, top_k), 0.5)
    kinds = [("float", -1), ("int8", -1), ("int4", 128)] + ([("int4", 32), ("int4", 64)] if full else [])
    variants = [
        (k, g, act, sdt) for (k, g), act in itertools.product(kinds, ACTS) for sdt in (act, torch.float32)
    ]
    for kind, group, act, sdt in variants:
        if kind == "float" and sdt != act:
            continue
        rec.label = f"moe {kind} group={group}"
        extra: dict[str, torch.Tensor | None] = {}
        if kind == "float":
            w13, w2 = _e(e, 2 * inter, h, dtype=act), _e(e, h, inter, dtype=act)
        else:  # qserve's layout per expert, stacked: what the loader hands the kernel
            q13, q2 = (
                quantize(torch.zeros(2 * inter, h), kind, group, scale_dtype=sdt),
                quantize(torch.zeros(h, inter), kind, group, scale_dtype=sdt),
            )
            w13, w2 = (q.qweight.expand(e, *q.qweight.shape).contiguous() for q in (q13, q2))
            extra["w13_scales"], extra["w2_scales"] = (
                q.scales.expand(e, *q.scales.shape).contiguous() for q in (q13, q2)
            )
            if kind == "int4":
                assert q13.zeros is not None and q2.zeros is not None
                extra["w13_zeros"], extra["w2_zeros"] = (
                    z.expand(e, *z.shape).contiguous() for z in (q13.zeros, q2.zeros)
                )
        fused_moe_triton(_e(t, h, dtype=act), ids, weights, w13, w2, kind, inter, group_size=group, **extra)


def _bnb4_launches(rec: _Recorder, full: bool) -> None:
    """The bitsandbytes NF4 / FP4 matmul: every config as the launcher adapts it (choose_config) x fp16 / bf16 /
    fp32 activations x double quantization or not x row-aligned blocks (K % 64 == 0, bitsandbytes' blocksize
    64) or blocks spanning rows."""
    from qserve.kernels.bnb4_matmul import Bnb4Weight, bnb4_configs, bnb4_matmul_triton

    n, blocksize = MM_N, 64
    for k, nested, cfg in itertools.product((MM_K, MM_K - 16), (False, True), bnb4_configs()):
        blocks = -(-n * k // blocksize)
        absmax = _e(blocks, dtype=torch.uint8 if nested else torch.float32)
        nested_parts = (
            (_e(256, dtype=torch.float32), _e(-(-blocks // 256), dtype=torch.float32))
            if nested
            else (None, None)
        )
        w = Bnb4Weight(_e(n * k // 2, dtype=torch.uint8), _e(16, dtype=torch.float32), absmax, blocksize, (n, k),
                       *nested_parts, 256, 0.5)  # fmt: skip
        for act in FLOATS:  # the configs the launcher chooses (choose_config) for this M, K and dtype
            rec.label = f"bnb4 k={k} nested={nested}"
            bnb4_matmul_triton(_e(cfg["BLOCK_M"], k, dtype=act), w)


def launches(full: bool = False) -> list[Launch]:
    """Every launch of every Triton kernel in ``kernels/`` over the axes of the module docstring."""
    if qml._interpreting():
        raise RuntimeError("unset TRITON_INTERPRET: the ahead-of-time check compiles, it never interprets")
    with capture() as rec:
        _matmul_launches(rec, full)
        _attention_launches(rec, full)
        _moe_launches(rec, full)
        _bnb4_launches(rec, full)
    return rec.launches
