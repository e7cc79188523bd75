"""CUDA graphs of decode-only steps, one per token bucket, captured at start-up over the step buffers.

A decode bucket B runs B sequence rows of one query each: the real decodes first, then padding sequences
of length 0 whose token rows have slot -1 (no KV write; the Triton decode kernel returns early for them).
Every launch size is fixed by B (``num_decodes = B``, the context split bounded by max_model_len), so one
graph replays every step of that bucket; the inputs are the persistent step buffers, written in place
before each replay. Steps with a prefill, or larger than the biggest bucket, run eager.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from qserve.engine.step_buffers import StepBuffers, StepShape, token_buckets
from qserve.kernels.attention import KVLayout
from qserve.layers.attention import AttentionMetadata

logger = logging.getLogger("qserve")
MAX_CAPTURE = 256  # the largest decode bucket captured (vLLM's default tops out at 512 on big GPUs)


def capture_sizes(max_tokens: int, max_seqs: int) -> list[int]:
    """The decode buckets captured, ascending: every token bucket up to min(max_num_seqs, budget, 256)."""
    top = min(max_seqs, max_tokens, MAX_CAPTURE)
    return [b for b in token_buckets(max_tokens) if b <= top]


class CudaGraphRunner:
    """Captures ``model``'s forward for every decode bucket up to min(max_num_seqs, token budget, 256).

    Args:
        model: the CausalLM, called as ``model(input_ids, positions, meta, kv_caches)``.
        buffers: the step buffers every graph reads.
        kv_caches, layout: the paged cache.
        max_seq_len: bound on any decode's context (max_model_len): sizes the decode split.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        buffers: StepBuffers,
        kv_caches: list[torch.Tensor],
        layout: KVLayout,
        max_seq_len: int,
    ):
        self.model, self.buffers, self.kv_caches, self.layout = model, buffers, kv_caches, layout
        self.max_seq_len = max_seq_len
        self.sizes = capture_sizes(buffers.max_tokens, buffers.max_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # (B, H) hidden states each graph writes
        self.pool: Any = None  # one memory pool shared by every graph (torch.cuda.graph_pool_handle())
        self.memory_bytes = 0  # the pool: memory the allocator reserved inside the captures
        self.device_bytes = 0  # all device memory the captures took (the pool, warm-ups, graph objects)

    def meta(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        v = self.buffers.view(StepShape(bucket, bucket))
        meta = v.metadata(self.layout)
        meta.num_decodes, meta.max_decode_seq_len = bucket, self.max_seq_len
        return v.input_ids, v.positions, meta

    @torch.inference_mode()
    def capture(self) -> float:
        """Warm up (Triton autotuning and compiles happen here, outside capture), then capture each bucket,
        largest first so the smaller graphs reuse its pool. Returns the seconds it took."""
        t0, free0 = time.perf_counter(), torch.cuda.mem_get_info()[0]
        self.pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):
            self.buffers.fill_padding(StepShape(b, b))
            ids, pos, meta = self.meta(b)
            self.model(ids, pos, meta, self.kv_caches)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            reserved = torch.cuda.memory_reserved()  # the eager warm-up's memory stays outside the pool
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[b] = self.model(ids, pos, meta, self.kv_caches)
            self.memory_bytes += torch.cuda.memory_reserved() - reserved
            self.graphs[b] = graph
        torch.cuda.synchronize()
        self.device_bytes = free0 - torch.cuda.mem_get_info()[0]
        return time.perf_counter() - t0

    def bucket_for(self, tokens: int, seqs: int, num_decodes: int) -> int | None:
        """The graph a step runs as: decode-only steps up to the largest captured bucket, else None."""
        if num_decodes != seqs or tokens != seqs or not self.graphs:
            return None
        shape = self.buffers.padded_shape(tokens, seqs)
        return shape.tokens if shape is not None and shape.tokens in self.graphs else None

    def replay(self, bucket: int) -> torch.Tensor:
        self.graphs[bucket].replay()
        return self.outputs[bucket]
