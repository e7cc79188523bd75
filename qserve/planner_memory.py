"""The planner's memory model: per-token and per-block byte accounting shared with the engine, the decode
roofline, and the plan dataclasses. :mod:`qserve.planner` builds plans from these; import from there.

Budget, in order: ``memory = reserve + weights + activations + step buffers + CUDA graph pool + KV pool``,
where

* weights: exact safetensors header bytes for a local checkpoint (a qserve-converted one counts its
  packed bytes), else from the config: float = 2 B/param (fp32: 4); int8 = 1 B/weight + one 16-bit scale per
  output channel; int4 = 0.5 B/weight + per group of 128 inputs a 16-bit scale and a uint8 zero point
  (docs/FORMAT.md). Embeddings, lm_head, norms, biases and MoE routers stay 16-bit float. An MoE's routed
  experts are all resident (``expert_weights_bytes``); a token reads top_k of E of them per sparse layer
  (``active_expert_weights_bytes``), and the decode roofline reads the share a batch is expected to hit.
* activations (an estimate of one step's transient peak):
  ``T * (2 * hidden + 3 * intermediate) * act_bytes + min(S, T) * vocab * 4 * 2`` for a step of T =
  max_num_batched_tokens tokens (residual + normed input, gate/up output and SiLU product) and fp32
  logits plus probabilities of S = max_num_seqs sampled rows; attention is assumed fused (no score matrix).
* step buffers (exact) and the CUDA graph pool (an estimate; only on CUDA without --enforce-eager): the
  step's fixed allocations, :mod:`qserve.planner_step` (its docstring has the formulas).
* reserve: 0 for a plain --memory budget; on a GPU the CUDA context (1 GiB) plus GPU_HEADROOM of what
  is left after the weights, the same share the engine leaves free when it sizes itself on CUDA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qserve.cache.kv_cache import KVCacheSpec, resolve_kv_dtype
from qserve.config import EngineConfig, ModelConfig
from qserve.planner_step import cuda_graph_pool_bytes, step_blocks, step_buffer_bytes
from qserve.presets import GPUPreset, ModelSource, cdiv

GPU_RESERVE_BYTES = 1 << 30  # CUDA context, cuBLAS / Triton workspaces
GPU_HEADROOM = 0.10  # of the memory left after the weights: allocator fragmentation, other processes
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


@dataclass(frozen=True)
class StepAllocations:
    """The step's fixed device allocations beside the KV pool (:mod:`qserve.planner_step`)."""

    step_buffer_bytes: int
    cuda_graph_pool_bytes: int  # 0: no graphs (a CPU device, or --enforce-eager)

    @property
    def total(self) -> int:
        return self.step_buffer_bytes + self.cuda_graph_pool_bytes


def step_allocations(
    cfg: ModelConfig,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_model_len: int,
    block_size: int,
    act_bytes: int,
    weights: str,
    cuda_graphs: bool,
) -> StepAllocations:
    """What the engine allocates for the step loop: the step buffers and, with ``cuda_graphs``, the pool."""
    buffers = step_buffer_bytes(max_num_batched_tokens, max_num_seqs, step_blocks(max_model_len, block_size))
    pool = 0
    if cuda_graphs:
        pool = cuda_graph_pool_bytes(
            cfg, max_num_seqs, max_num_batched_tokens, max_model_len, act_bytes, weights
        )
    return StepAllocations(buffers, pool)


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
    weights: str = "float",
) -> int:
    """KV blocks of an engine: ``config.kv_cache_memory`` when given; else room for max_num_seqs
    full-length sequences, capped on CUDA by ``free_bytes * (1 - GPU_HEADROOM) - activations - step
    buffers - CUDA graph pool`` (free memory measured after the weights are loaded, so the CUDA context is
    already counted; the pool unless ``config.enforce_eager``), as :func:`qserve.planner.plan` subtracts
    them, and on CPU by ``cpu_cap``. ``weights``: int8 | int4 | float (the pool's matmul scratch). At
    least one block."""
    if config.kv_cache_memory is not None:
        return plan_kv_blocks(spec, config.kv_cache_memory)
    want = config.max_num_seqs * max_model_len * spec.bytes_per_token
    if free_bytes is None:
        cap = cpu_cap
    else:
        act = activation_bytes(cfg, config.max_num_batched_tokens, config.max_num_seqs, act_bytes)
        fixed = step_allocations(
            cfg, config.max_num_seqs, config.max_num_batched_tokens, max_model_len, spec.block_size,
            act_bytes, weights, cuda_graphs=not config.enforce_eager,
        )  # fmt: skip
        cap = gpu_usable(free_bytes) - act - fixed.total
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
    """Weights one token multiplies through: every projection (of an MoE, top_k of the routed experts)
    and the lm_head (2 FLOPs each)."""
    inv = src.inventory
    experts = sum(n * k for n, k in inv.expert_linears)
    active = sum(n * k for n, k in inv.linears) - experts + experts * inv.active_fraction
    return int(active) + src.config.vocab_size * src.config.hidden_size


def experts_hit_fraction(active_fraction: float, batch: int) -> float:
    """Expected share of an MoE layer's experts a decode step of ``batch`` tokens reads, each token picking
    top_k of E (``active_fraction`` = top_k / E) independently and uniformly: ``1 - (1 - k/E)^batch``."""
    return 1.0 - (1.0 - active_fraction) ** max(batch, 0)


def decode_estimate(
    gpu: GPUPreset, src: ModelSource, weights_bytes: int, kv_bytes_per_token: int, batch: int,
    context: int, price_per_hour: float | None = None, expert_bytes: int = 0,
) -> DecodeEstimate:  # fmt: skip
    """``expert_bytes``: the routed experts' part of ``weights_bytes`` (MoE); a step reads only the share of
    them its ``batch`` tokens are expected to hit (:func:`experts_hit_fraction`)."""
    cfg = src.config
    if expert_bytes:
        unread = 1 - experts_hit_fraction(src.inventory.active_fraction, batch)
        weights_bytes = int(weights_bytes - expert_bytes * unread)
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
    expert_weights_bytes: int  # MoE: all routed experts, resident (part of weights_bytes); 0 when dense
    active_expert_weights_bytes: int  # MoE: the routed-expert bytes one token reads (top_k of E per layer)
    activation_bytes: int
    step_buffer_bytes: int  # the persistent step buffers (exact)
    cuda_graph_pool_bytes: int  # the shared CUDA graph pool (estimate); 0 on CPU or with enforce_eager
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


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"
