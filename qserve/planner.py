"""Capacity planning: the exact byte budget of a model before it is loaded, shared with the engine.

`qserve plan` and the engine use the same functions: every KV number comes from
:class:`qserve.cache.kv_cache.KVCacheSpec` (the formulas the engine allocates with), and
:func:`plan_kv_blocks` / :func:`engine_kv_blocks` are what ``LLMEngine`` calls to size its KV pool.

The code lives in three modules; every public name is re-exported here, so import from ``qserve.planner``:

* :mod:`qserve.planner_memory`: the byte budget (weights, activations, reserve, KV pool; its docstring has
  the formulas), the functions the engine sizes itself with, the decode roofline and the plan dataclasses;
* this module: :func:`plan` and :func:`plan_engine`, which validate their inputs and size one configuration
  and the weights x KV comparison;
* :mod:`qserve.planner_report`: :func:`print_plan` (rich tables) and :func:`save_plot`.

:mod:`qserve.planner_replicas` (replicas for a load) builds on a plan from here.
"""

from __future__ import annotations

from qserve.cache.kv_cache import KVCacheSpec
from qserve.config import canonical_dtype
from qserve.errors import QServeError
from qserve.planner_memory import (
    _DEFAULTS,
    _SHORT,
    GPU_HEADROOM,
    GPU_RESERVE_BYTES,
    Comparison,
    DecodeEstimate,
    MemoryPlan,
    StepAllocations,
    _gib,
    activation_bytes,
    compute_dtype,
    decode_estimate,
    dense_weights,
    engine_kv_blocks,
    gpu_usable,
    kv_spec_for,
    max_concurrent_sequences,
    plan_kv_blocks,
    recommend_max_num_seqs,
    reserve_bytes,
    step_allocations,
)
from qserve.planner_report import print_plan, save_plot
from qserve.presets import FLOAT_BYTES, find_gpu, load_model_source

__all__ = [
    "DEFAULT_CONTEXT",
    "GPU_HEADROOM",
    "GPU_RESERVE_BYTES",
    "WEIGHT_CHOICES",
    "Comparison",
    "DecodeEstimate",
    "MemoryPlan",
    "StepAllocations",
    "activation_bytes",
    "compute_dtype",
    "decode_estimate",
    "dense_weights",
    "engine_kv_blocks",
    "gpu_usable",
    "kv_spec_for",
    "max_concurrent_sequences",
    "plan",
    "plan_engine",
    "plan_kv_blocks",
    "print_plan",
    "recommend_max_num_seqs",
    "reserve_bytes",
    "save_plot",
    "step_allocations",
]

WEIGHT_CHOICES = ("auto", "fp32", "fp16", "bf16", "int8", "int4")
DEFAULT_CONTEXT = 4096  # tokens per sequence (prompt + output) planned for unless --context says otherwise


def plan(
    model: str,
    *,
    memory: int | None = None,
    gpu: str | None = None,
    weights: str = "auto",
    kv_cache_dtype: str = "auto",
    context: int | None = None,
    max_num_seqs: int | None = None,
    block_size: int = 16,
    max_num_batched_tokens: int | None = None,
    price_per_hour: float | None = None,
    max_model_len: int | None = None,
    device: str | None = None,
    enforce_eager: bool = False,
) -> MemoryPlan:
    """Plan ``model`` (directory, 'demo' or preset) on a ``memory`` byte budget or a ``gpu`` preset.

    ``max_model_len``: the engine's (sizes the block-table buffer; default: ``context``). ``device``:
    ``cuda`` or ``cpu`` (default: cuda with a ``gpu`` preset, else cpu); on cuda without
    ``enforce_eager`` the CUDA graph pool is counted.

    Raises QServeError for bad input and for a budget that cannot hold the weights and one KV block.
    """
    if memory is not None and gpu is not None:
        raise QServeError("--memory and --gpu are exclusive: give one (a GPU preset carries its memory)")
    if memory is None and gpu is None:
        raise QServeError("give a budget: --memory SIZE (e.g. 24GiB) or --gpu NAME (e.g. H100-80GB)")
    if weights not in WEIGHT_CHOICES:
        raise QServeError(f"unknown --weights {weights!r}; choose from {', '.join(WEIGHT_CHOICES)}")
    for flag, value in (
        ("--context", context),
        ("--max-num-seqs", max_num_seqs),
        ("--block-size", block_size),
        ("--max-model-len", max_model_len),
    ):
        if value is not None and value < 1:
            raise QServeError(f"{flag} must be at least 1, got {value}")
    if price_per_hour is not None and (gpu is None or price_per_hour < 0):
        raise QServeError("--price-per-hour needs --gpu and a non-negative price")
    g = find_gpu(gpu) if gpu is not None else None
    mem = g.memory_bytes if g is not None else int(memory or 0)
    src = load_model_source(model)
    cfg = src.config
    if context is not None and context > cfg.max_position_embeddings:
        raise QServeError(f"--context {context} exceeds the model's {cfg.max_position_embeddings} positions")
    ctx = context or min(cfg.max_position_embeddings, DEFAULT_CONTEXT)
    tokens = max_num_batched_tokens or _DEFAULTS.max_num_batched_tokens
    seqs_cap = max_num_seqs or _DEFAULTS.max_num_seqs
    graphs = (device or ("cuda" if g is not None else "cpu")) == "cuda" and not enforce_eager
    stored = _SHORT.get(src.inventory.stored, src.inventory.stored)

    def size(w: str, kv: str) -> tuple[int, int, int, KVCacheSpec, int, StepAllocations]:
        wb = src.inventory.nbytes(w)
        act_b = FLOAT_BYTES[compute_dtype(cfg, w)]
        act = activation_bytes(cfg, tokens, seqs_cap, act_b)
        res = reserve_bytes(mem, wb, g is not None)
        spec = kv_spec_for(cfg, w, kv, block_size)
        kind = stored if w == "auto" else w
        fixed = step_allocations(
            cfg, seqs_cap, tokens, max_model_len or ctx, block_size, act_b, kind, graphs
        )  # the step buffers and, on CUDA, the graph pool: sized like the activations, at seqs_cap
        return wb, act, res, spec, mem - res - wb - act - fixed.total, fixed

    wb, act, res, spec, pool, fixed = size(weights, kv_cache_dtype)
    label = f"{weights} weights" if weights != "auto" else "the weights"
    if wb + res > mem:
        plus = f" plus the runtime reserve ({_gib(res)})" if res else ""
        raise QServeError(
            f"memory {_gib(mem)} is smaller than {label} ({_gib(wb)}){plus} by {_gib(wb + res - mem)}"
        )
    blocks = plan_kv_blocks(spec, pool)
    if blocks < 1:
        raise QServeError(
            f"memory {_gib(mem)} leaves {_gib(max(pool, 0))} for the KV cache after {label} ({_gib(wb)}), "
            f"activations ({_gib(act)}), step buffers and CUDA graphs ({_gib(fixed.total)}) and reserve "
            f"({_gib(res)}): less than one block "
            f"({spec.bytes_per_block} B)"
        )
    capacity = blocks * block_size
    concurrent = max_concurrent_sequences(capacity, ctx, block_size)
    n_seqs = recommend_max_num_seqs(concurrent, max_num_seqs)

    def estimate(w: str, w_bytes: int, bpt: int, fit: int) -> DecodeEstimate | None:
        batch = min(seqs_cap, fit)
        if g is None or batch < 1:
            return None
        experts = src.inventory.expert_nbytes(w)
        return decode_estimate(g, src, w_bytes, bpt, batch, ctx, price_per_hour, experts)

    rows = []
    for w in ("bf16", "int8", "int4"):
        for kv in ("fp16", "int8", "int4"):
            cwb, _, _, cspec, cpool, _ = size(w, kv)
            cap = plan_kv_blocks(cspec, cpool) * block_size
            fit = max_concurrent_sequences(cap, ctx, block_size)
            est = estimate(w, cwb, cspec.bytes_per_token, fit)
            tps = est.tokens_per_second if est else None
            rows.append(Comparison(w, kv, cwb, cspec.bytes_per_token, cap, fit, tps))
    return MemoryPlan(
        model=src.name,
        source=src.kind,
        gpu=g.name if g else None,
        memory_bytes=mem,
        weights=stored if weights == "auto" else weights,
        kv_cache_dtype=spec.dtype,
        context=ctx,
        block_size=block_size,
        requested_max_num_seqs=max_num_seqs,
        price_per_hour=price_per_hour,
        weights_bytes=wb,
        expert_weights_bytes=src.inventory.expert_nbytes(weights),
        active_expert_weights_bytes=src.inventory.active_expert_nbytes(weights),
        activation_bytes=act,
        step_buffer_bytes=fixed.step_buffer_bytes,
        cuda_graph_pool_bytes=fixed.cuda_graph_pool_bytes,
        reserve_bytes=res,
        kv_cache_bytes=pool,
        kv_bytes_per_token=spec.bytes_per_token,
        kv_bytes_per_block=spec.bytes_per_block,
        kv_num_blocks=blocks,
        kv_capacity_tokens=capacity,
        max_concurrent_sequences=concurrent,
        max_num_seqs=n_seqs,
        max_num_batched_tokens=tokens,
        decode=estimate(weights, wb, spec.bytes_per_token, concurrent),
        comparison=rows,
    )


def plan_engine(
    model: str,
    memory_budget: int,
    *,
    dtype: str = "auto",
    kv_cache_dtype: str = "auto",
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    device: str = "cpu",
    enforce_eager: bool = False,
) -> MemoryPlan:
    """The plan `serve --memory-budget` builds its engine with: pass ``kv_cache_bytes`` as
    EngineConfig.kv_cache_memory and ``max_num_seqs`` (auto when None). ``memory_budget`` covers weights,
    activations, step buffers, the CUDA graph pool (``device`` cuda without ``enforce_eager``) and KV (no
    reserve); weights as the engine loads them: a quantized checkpoint stays quantized, ``dtype`` recasts a
    float one; sequences are planned at ``max_model_len`` tokens (default: the model's positions, capped at
    DEFAULT_CONTEXT), and the block tables at the engine's max_model_len."""
    src = load_model_source(model)
    weights = "auto"
    if dtype != "auto" and src.config.quantization is None:
        weights = _SHORT[canonical_dtype(dtype)]  # the short name: fp32 | fp16 | bf16
    positions = src.config.max_position_embeddings
    ctx = min(max_model_len, positions) if max_model_len else None
    return plan(
        model,
        memory=memory_budget,
        weights=weights,
        kv_cache_dtype=kv_cache_dtype,
        context=ctx,
        max_num_seqs=max_num_seqs,
        max_model_len=ctx or positions,  # what the engine runs with
        device=device,
        enforce_eager=enforce_eager,
    )
