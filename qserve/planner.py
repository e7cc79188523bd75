"""Capacity planning: the exact byte budget of a model before it is loaded, shared with the engine.

`qserve plan` and the engine use the same functions: every KV number comes from
:class:`qserve.cache.kv_cache.KVCacheSpec` (the formulas the engine allocates with), and
:func:`plan_kv_blocks` / :func:`engine_kv_blocks` are what ``LLMEngine`` calls to size its KV pool.

Budget, in order: ``memory = reserve + weights + activations + KV pool``, where

* weights: exact safetensors header bytes for a local checkpoint (a qserve-converted one counts its
  packed bytes), else from the config: float = 2 B/param (fp32: 4); int8 = 1 B/weight + one 16-bit scale per
  output channel; int4 = 0.5 B/weight + per group of 128 inputs a 16-bit scale and a uint8 zero point
  (docs/FORMAT.md). Embeddings, lm_head, norms and biases stay 16-bit float.
* activations (an estimate of one step's transient peak):
  ``T * (2 * hidden + 3 * intermediate) * act_bytes + min(S, T) * vocab * 4 * 2`` for a step of T =
  max_num_batched_tokens tokens (residual + normed input, gate/up output and SiLU product) and fp32
  logits plus probabilities of S = max_num_seqs sampled rows; attention is assumed fused (no score matrix).
* reserve: 0 for a plain --memory budget; on a GPU the CUDA context (1 GiB) plus GPU_HEADROOM of what
  is left after the weights, the same share the engine leaves free when it sizes itself on CUDA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qserve.cache.kv_cache import KVCacheSpec, resolve_kv_dtype
from qserve.config import EngineConfig, ModelConfig, canonical_dtype
from qserve.errors import QServeError
from qserve.presets import FLOAT_BYTES, GPUPreset, ModelSource, cdiv, find_gpu, load_model_source

WEIGHT_CHOICES = ("auto", "fp32", "fp16", "bf16", "int8", "int4")
GPU_RESERVE_BYTES = 1 << 30  # CUDA context, cuBLAS / Triton workspaces
GPU_HEADROOM = 0.10  # of the memory left after the weights: allocator fragmentation, other processes
DEFAULT_CONTEXT = 4096  # tokens per sequence (prompt + output) planned for unless --context says otherwise
_DEFAULTS = EngineConfig(model="")  # max_num_seqs (the cap on a recommendation), max_num_batched_tokens
_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # dtype -> KV / --weights name


def compute_dtype(cfg: ModelConfig, weights: str) -> str:
    """The float dtype the model computes in with ``weights`` (int8/int4 keep the checkpoint's)."""
    return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(weights, cfg.dtype)


def kv_spec_for(cfg: ModelConfig, weights: str, kv_cache_dtype: str, block_size: int) -> KVCacheSpec:
    """The KVCacheSpec the engine builds for this model (``auto`` KV = the compute dtype)."""
    kv = resolve_kv_dtype(kv_cache_dtype, _SHORT[compute_dtype(cfg, weights)])
    return KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, kv)


def activation_bytes(cfg: ModelConfig, max_num_batched_tokens: int, max_num_seqs: int, act_bytes: int) -> int:
    """Estimated transient peak of one step (module docstring): MLP activations + sampled logits."""
    t, rows = max_num_batched_tokens, min(max_num_seqs, max_num_batched_tokens)
    return t * (2 * cfg.hidden_size + 3 * cfg.intermediate_size) * act_bytes + rows * cfg.vocab_size * 4 * 2


def gpu_usable(free_bytes: int) -> int:
    """What the engine may use of the device memory free after loading the weights (the rest: headroom)."""
    return int(free_bytes * (1 - GPU_HEADROOM))


def reserve_bytes(memory_bytes: int, weights_bytes: int, on_gpu: bool) -> int:
    """Runtime reserve: CUDA context + GPU_HEADROOM of what the weights leave; 0 for a CPU budget."""
    if not on_gpu:
        return 0
    free = max(memory_bytes - GPU_RESERVE_BYTES - weights_bytes, 0)
    return GPU_RESERVE_BYTES + free - gpu_usable(free)


def plan_kv_blocks(spec: KVCacheSpec, budget_bytes: int) -> int:
    """Whole KV blocks a pool of ``budget_bytes`` holds: exactly what the engine allocates."""
    return spec.num_blocks(max(budget_bytes, 0))


def engine_kv_blocks(
    spec: KVCacheSpec,
    cfg: ModelConfig,
    config: EngineConfig,
    max_model_len: int,
    act_bytes: int,
    free_bytes: int | None,
    cpu_cap: int,
) -> int:
    """KV blocks of an engine: ``config.kv_cache_memory`` when given; else room for max_num_seqs
    full-length sequences, capped on CUDA by ``free_bytes * (1 - GPU_HEADROOM) - activations`` (free
    memory measured after the weights are loaded, so the CUDA context is already counted) and on CPU by
    ``cpu_cap``. At least one block."""
    if config.kv_cache_memory is not None:
        return plan_kv_blocks(spec, config.kv_cache_memory)
    want = config.max_num_seqs * max_model_len * spec.bytes_per_token
    if free_bytes is None:
        cap = cpu_cap
    else:
        act = activation_bytes(cfg, config.max_num_batched_tokens, config.max_num_seqs, act_bytes)
        cap = gpu_usable(free_bytes) - act
    return plan_kv_blocks(spec, max(min(want, cap), spec.bytes_per_block))


def max_concurrent_sequences(capacity_tokens: int, context: int, block_size: int) -> int:
    """Sequences of ``context`` tokens that fit at once (each holds whole blocks)."""
    return capacity_tokens // (cdiv(context, block_size) * block_size)


def recommend_max_num_seqs(concurrent: int, requested: int | None = None) -> int:
    """``requested`` if given, else the sequences that fit, within [1, EngineConfig's default 256]."""
    return requested or min(max(concurrent, 1), _DEFAULTS.max_num_seqs)


@dataclass(frozen=True)
class DecodeEstimate:
    """Roofline estimate of decode (not a measurement): every running sequence at ``context`` tokens.

    A step moves the weights once plus each sequence's KV, and does 2 FLOPs per weight per sequence
    plus attention; it takes the longer of bytes / bandwidth and FLOPs / peak.
    """

    batch: int
    context: int
    step_seconds: float
    tokens_per_second: float
    bound: str  # "memory" | "compute"
    cost_per_million_tokens: float | None  # USD per 1M output tokens at price_per_hour


def dense_weights(src: ModelSource) -> int:
    """Weights one token multiplies through: every projection and the lm_head (2 FLOPs each)."""
    return sum(n * k for n, k in src.inventory.linears) + src.config.vocab_size * src.config.hidden_size


def decode_estimate(
    gpu: GPUPreset, src: ModelSource, weights_bytes: int, kv_bytes_per_token: int, batch: int,
    context: int, price_per_hour: float | None = None,
) -> DecodeEstimate:  # fmt: skip
    cfg = src.config
    moved = weights_bytes + batch * context * kv_bytes_per_token
    flops = batch * (2 * dense_weights(src) + 4 * cfg.num_layers * cfg.q_size * context)
    t_mem, t_flop = moved / gpu.bandwidth, flops / gpu.flops
    step = max(t_mem, t_flop)
    tps = batch / step
    cost = price_per_hour / 3600 / tps * 1e6 if price_per_hour is not None else None
    return DecodeEstimate(batch, context, step, tps, "memory" if t_mem >= t_flop else "compute", cost)


@dataclass(frozen=True)
class Comparison:
    """One configuration of the weights x KV comparison, at the plan's memory and context."""

    weights: str
    kv_cache_dtype: str
    weights_bytes: int
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    max_concurrent_sequences: int
    decode_tokens_per_second: float | None  # roofline estimate, GPU presets only


@dataclass(frozen=True)
class MemoryPlan:
    """A plan: its inputs, then the byte budget. Field names are the stable `qserve plan --json` keys."""

    model: str
    source: str  # "directory" | "preset"
    gpu: str | None
    memory_bytes: int
    weights: str  # resolved: fp32 | fp16 | bf16 | int8 | int4 ("auto" = as the checkpoint stores them)
    kv_cache_dtype: str  # resolved: fp16 | bf16 | fp32 | int8 | int4
    context: int
    block_size: int
    requested_max_num_seqs: int | None
    price_per_hour: float | None
    weights_bytes: int
    activation_bytes: int
    reserve_bytes: int
    kv_cache_bytes: int  # the KV pool: what `serve` passes the engine as kv_cache_memory
    kv_bytes_per_token: int
    kv_bytes_per_block: int
    kv_num_blocks: int
    kv_capacity_tokens: int
    max_concurrent_sequences: int
    max_num_seqs: int
    max_num_batched_tokens: int
    decode: DecodeEstimate | None
    comparison: list[Comparison] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
) -> MemoryPlan:
    """Plan ``model`` (directory, 'demo' or preset) on a ``memory`` byte budget or a ``gpu`` preset.

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

    def size(w: str, kv: str) -> tuple[int, int, int, KVCacheSpec, int]:
        wb = src.inventory.nbytes(w)
        act = activation_bytes(cfg, tokens, seqs_cap, FLOAT_BYTES[compute_dtype(cfg, w)])
        res = reserve_bytes(mem, wb, g is not None)
        spec = kv_spec_for(cfg, w, kv, block_size)
        return wb, act, res, spec, mem - res - wb - act

    wb, act, res, spec, pool = size(weights, kv_cache_dtype)
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
            f"activations ({_gib(act)}) and reserve ({_gib(res)}): less than one block "
            f"({spec.bytes_per_block} B)"
        )
    capacity = blocks * block_size
    concurrent = max_concurrent_sequences(capacity, ctx, block_size)
    n_seqs = recommend_max_num_seqs(concurrent, max_num_seqs)

    def estimate(w_bytes: int, bpt: int, fit: int) -> DecodeEstimate | None:
        batch = min(seqs_cap, fit)
        if g is None or batch < 1:
            return None
        return decode_estimate(g, src, w_bytes, bpt, batch, ctx, price_per_hour)

    rows = []
    for w in ("bf16", "int8", "int4"):
        for kv in ("fp16", "int8", "int4"):
            cwb, _, _, cspec, cpool = size(w, kv)
            cap = plan_kv_blocks(cspec, cpool) * block_size
            fit = max_concurrent_sequences(cap, ctx, block_size)
            est = estimate(cwb, cspec.bytes_per_token, fit)
            tps = est.tokens_per_second if est else None
            rows.append(Comparison(w, kv, cwb, cspec.bytes_per_token, cap, fit, tps))
    return MemoryPlan(
        model=src.name,
        source=src.kind,
        gpu=g.name if g else None,
        memory_bytes=mem,
        weights=_SHORT.get(src.inventory.stored, src.inventory.stored) if weights == "auto" else weights,
        kv_cache_dtype=spec.dtype,
        context=ctx,
        block_size=block_size,
        requested_max_num_seqs=max_num_seqs,
        price_per_hour=price_per_hour,
        weights_bytes=wb,
        activation_bytes=act,
        reserve_bytes=res,
        kv_cache_bytes=pool,
        kv_bytes_per_token=spec.bytes_per_token,
        kv_bytes_per_block=spec.bytes_per_block,
        kv_num_blocks=blocks,
        kv_capacity_tokens=capacity,
        max_concurrent_sequences=concurrent,
        max_num_seqs=n_seqs,
        max_num_batched_tokens=tokens,
        decode=estimate(wb, spec.bytes_per_token, concurrent),
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
) -> MemoryPlan:
    """The plan `serve --memory-budget` builds its engine with: pass ``kv_cache_bytes`` as
    EngineConfig.kv_cache_memory and ``max_num_seqs`` (auto when None). ``memory_budget`` covers weights,
    activations and KV (no reserve); weights as the engine loads them: a quantized checkpoint stays
    quantized, ``dtype`` recasts a float one; sequences are planned at ``max_model_len`` tokens."""
    src = load_model_source(model)
    weights = "auto"
    if dtype != "auto" and src.config.quantization is None:
        weights = _SHORT[canonical_dtype(dtype)]  # the short name: fp32 | fp16 | bf16
    ctx = min(max_model_len, src.config.max_position_embeddings) if max_model_len else None
    return plan(
        model,
        memory=memory_budget,
        weights=weights,
        kv_cache_dtype=kv_cache_dtype,
        context=ctx,
        max_num_seqs=max_num_seqs,
    )


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


# ----------------------------------------------------------------------------- presentation


def print_plan(p: MemoryPlan) -> None:
    """The byte budget and the weights x KV comparison as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    where = f"{p.gpu} ({_gib(p.memory_bytes)})" if p.gpu else f"a {_gib(p.memory_bytes)} budget"
    t = Table(title=f"qserve plan: {p.model} on {where}", title_justify="left")
    for col in ("", "bytes", "how"):
        t.add_column(col, justify="right" if col == "bytes" else "left")
    per_seq = cdiv(p.context, p.block_size) * p.block_size
    rows = [
        ("memory", _gib(p.memory_bytes), p.gpu or "--memory"),
        ("runtime reserve", _gib(p.reserve_bytes), "CUDA ctx + 10% headroom" if p.gpu else "none"),
        (f"weights ({p.weights})", _gib(p.weights_bytes), "incl. scales, zeros"),
        ("activation peak", _gib(p.activation_bytes), f"estimate, {p.max_num_batched_tokens} tok/step"),
        ("KV cache pool", _gib(p.kv_cache_bytes), f"{p.kv_num_blocks:,} blocks"),
        (f"KV per token ({p.kv_cache_dtype})", f"{p.kv_bytes_per_token:,} B", f"{p.block_size} tokens/block"),
        ("KV capacity (tokens)", f"{p.kv_capacity_tokens:,}", "whole blocks"),
        (f"sequences of {p.context} tokens", str(p.max_concurrent_sequences), f"{per_seq} slots each"),
        ("max_num_seqs", str(p.max_num_seqs), "requested" if p.requested_max_num_seqs else "recommended"),
        ("max_num_batched_tokens", str(p.max_num_batched_tokens), "recommended"),
    ]
    if p.decode is not None:
        d = p.decode
        rows.append(("decode tokens/s", f"{d.tokens_per_second:,.0f}", f"roofline est., batch {d.batch}"))
        if d.cost_per_million_tokens is not None:
            rows.append(("USD / 1M output tokens", f"{d.cost_per_million_tokens:.3f}", "estimate"))
    for row in rows:
        t.add_row(*row)
    c = Table(title=f"weights x KV cache, sequences of {p.context} tokens", title_justify="left")
    for col in ("weights", "KV", "weights", "KV B/token", "KV tokens", "seqs", "tok/s est."):
        c.add_column(col, justify="left" if len(c.columns) < 2 else "right")
    for r in p.comparison:
        tps = f"{r.decode_tokens_per_second:,.0f}" if r.decode_tokens_per_second else "-"
        cap = f"{r.kv_capacity_tokens:,}" if r.kv_capacity_tokens else "no fit"
        kv = (r.kv_cache_dtype, _gib(r.weights_bytes), f"{r.kv_bytes_per_token:,}", cap)
        c.add_row(r.weights, *kv, str(r.max_concurrent_sequences), tps)
    console = Console()
    console.print(t)
    if p.max_concurrent_sequences == 0:
        console.print(f"note: {p.context} tokens exceed the KV capacity; serve would lower max_model_len")
    elif p.max_num_seqs > p.max_concurrent_sequences:
        console.print(
            f"note: only {p.max_concurrent_sequences} of {p.max_num_seqs} sequences fit at full length"
        )
    console.print(c)


def save_plot(p: MemoryPlan, path: str) -> None:
    """Concurrent sequences against context length, one line per weights x KV configuration."""
    try:
        import matplotlib
    except ImportError:
        raise QServeError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [1 << e for e in range(8, 21) if 1 << e <= max(p.context, 1 << 17)]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = {"bf16": "tab:blue", "int8": "tab:orange", "int4": "tab:green"}
    styles = {"fp16": "-", "int8": "--", "int4": ":"}
    for r in p.comparison:
        ys = [max_concurrent_sequences(r.kv_capacity_tokens, x, p.block_size) for x in contexts]
        label = f"weights {r.weights} ({_gib(r.weights_bytes)}), KV {r.kv_cache_dtype}"
        label += "" if r.kv_capacity_tokens else ": does not fit"
        ax.plot(contexts, [y if y > 0 else float("nan") for y in ys], styles[r.kv_cache_dtype],
                color=colors[r.weights], marker="o", markersize=3, label=label)  # fmt: skip
    ax.axvline(p.context, color="grey", linewidth=0.8, label=f"planned context ({p.context} tokens)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [f"{x // 1024}K" if x >= 1024 else str(x) for x in contexts])
    ax.set_yscale("log")
    where = f"{p.gpu} ({_gib(p.memory_bytes)})" if p.gpu else f"a {_gib(p.memory_bytes)} budget"
    ax.set_title(f"{p.model} on {where}: how many sequences fit in the KV cache")
    ax.set_xlabel("context length per sequence (tokens)")
    ax.set_ylabel("max concurrent sequences")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise QServeError(f"cannot write plot {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
