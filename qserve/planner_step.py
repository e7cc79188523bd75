"""The step's fixed device allocations, in the planner's budget: persistent step buffers and the CUDA graph pool.

* step buffers (exact): the device buffers :class:`qserve.engine.step_buffers.StepBuffers` allocates for
  ``max_num_batched_tokens`` token rows, ``max_num_seqs`` sequence rows and ``cdiv(max_model_len,
  block_size)`` blocks per sequence: ``24 T + 4 (2 S + 1 + S * blocks) + 16 S`` bytes (int64 ids, positions,
  slots, token sources and logits rows; int32 lengths, query offsets and block tables), counted from the
  same shape table.
* CUDA graph pool (an estimate, CUDA without --enforce-eager only): every decode bucket's graph
  (:func:`qserve.engine.cuda_graphs.capture_sizes`) shares one pool, captured largest first, so the pool
  holds the transient peak of the largest bucket's forward (B = its rows) plus every graph's output
  (smaller graphs reuse the freed intermediates):

  ``peak(B) + sum(buckets) * hidden * act``, with ``peak(B) = B * act * max(attention, mlp) + scratch``:

  - attention rows: residual, normed input, o_proj output (3 hidden) + qkv (q + 2 kv) + RoPE of q and k
    (product, product, sum: 3 (q + kv)) + attention output (q);
  - mlp rows: residual in and out, normed input (3 hidden) + gate/up (2 I) + SiLU and product (2 I); an
    MoE layer ``3 hidden + top_k * 4 I_expert + 4 I_shared`` plus fp32 router logits (4 B x E);
  - scratch, in fp32: decode split partials ``B * Hq * splits * (head_dim + 2) * 4`` when the context is
    split (``kernels.paged_attention.decode_partition``), split-K partials of the quantized matmul
    (``split * B * N * 4``), and for int8/int4 weights under fp32 activations the dequantized weight of
    the largest projection (``N * K * 4``); the split counts assume 132 SMs (H100 / H200: the most).
  - the allocator's granularity: the total rounds up to 2 MiB segments, plus one 20 MiB segment when a
    tensor falls between 1 and 10 MiB (PyTorch's large-buffer segment).

  Logits are computed outside the graphs (the activation estimate counts them). The engine logs this
  estimate beside the measured pool at start-up and warns when the measurement is larger.
"""

from __future__ import annotations

from qserve.config import ModelConfig
from qserve.engine.cuda_graphs import capture_sizes
from qserve.engine.step_buffers import step_buffer_bytes
from qserve.kernels.paged_attention import MIN_PARTITION
from qserve.kernels.quant_matmul_configs import choose_path, split_k_for

__all__ = ["ASSUMED_SMS", "cuda_graph_pool_bytes", "step_buffer_bytes", "step_blocks"]

# H100 / H200: more SMs split more (decode splits, split-K), so the estimate is an upper bound
ASSUMED_SMS = 132
_MIB = 1 << 20
_SEGMENT = 2 * _MIB  # the caching allocator's segment granularity (small pool segment, large rounding)
_LARGE_SEGMENT = 20 * _MIB  # the segment that holds allocations of 1-10 MiB


def step_blocks(max_model_len: int, block_size: int) -> int:
    """Blocks per sequence in the block-table buffer (the engine's ``cdiv(max_model_len, block_size)``)."""
    return -(-max_model_len // block_size)


def _linears(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(out, in) of the projections one dense decoder layer runs (qkv fused, gate/up fused)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return [(cfg.q_size + 2 * cfg.kv_size, h), (h, cfg.q_size), (2 * i, h), (h, i)]


def _decode_splits(cfg: ModelConfig, rows: int, max_model_len: int) -> int:
    want = -(-2 * ASSUMED_SMS // (rows * cfg.num_kv_heads))
    return max(1, min(want, -(-max_model_len // MIN_PARTITION)))


def cuda_graph_pool_bytes(
    cfg: ModelConfig,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_model_len: int,
    act_bytes: int,
    weights: str,
) -> int:
    """Estimated bytes of the shared CUDA graph pool (module docstring); ``weights``: int8 | int4 | a float."""
    sizes = capture_sizes(max_num_batched_tokens, max_num_seqs)
    if not sizes:
        return 0
    b, h, a = sizes[-1], cfg.hidden_size, act_bytes
    q, kv = cfg.q_size, cfg.kv_size
    attn = 3 * h + (q + 2 * kv) + 3 * (q + kv) + q
    mlp = 3 * h + 4 * cfg.intermediate_size
    tensors = [b * h * a, b * (q + 2 * kv) * a, b * 2 * cfg.intermediate_size * a]
    if cfg.moe is not None:
        m = cfg.moe
        moe_rows = 3 * h + m.top_k * 4 * m.intermediate_size + 4 * m.shared_expert_intermediate_size
        mlp = max(mlp, moe_rows + -(-4 * m.num_experts // a))
        tensors.append(b * m.top_k * 2 * m.intermediate_size * a)
    scratch = 0
    splits = _decode_splits(cfg, b, max_model_len)
    if splits > 1:
        scratch = b * cfg.num_heads * splits * (cfg.head_dim + 2) * 4
    if weights in ("int8", "int4"):
        for n, k in _linears(cfg):
            if a == 4:  # float32 activations take the dequantize path: the float weight is a temporary
                scratch = max(scratch, n * k * 4)
            else:
                split = split_k_for(choose_path(b), b, n, k, ASSUMED_SMS)
                scratch = max(scratch, split * b * n * 4 if split > 1 else 0)
    peak = b * a * max(attn, mlp) + scratch
    total = peak + sum(sizes) * h * a
    total = -(-total // _SEGMENT) * _SEGMENT
    if any(_MIB < t <= 10 * _MIB for t in tensors):
        total += _LARGE_SEGMENT
    return total
