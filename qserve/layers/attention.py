"""Attention over the paged KV cache, and the metadata that describes a packed batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qserve.kernels import cpu_native
from qserve.kernels.attention import KVLayout
from qserve.kernels.attention_graph import decode_attention_graph, store_kv_graph
from qserve.kernels.cpu_ops import paged_attention_cpu_op


@dataclass
class AttentionMetadata:
    """Everything attention needs about one packed batch; built by the ModelRunner, passed explicitly.

    Sequences are ordered decodes first. The batch may be padded (the compiled CPU step pads it to a bucket):
    padding token rows come last with slot -1, padding sequences come last with length 0 and an empty query
    range. Only tensors describe the batch, so a compiled forward reads no Python values that change per step.
    """

    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each new token, -1 on padding rows
    block_tables: torch.Tensor  # (S, max_blocks) int32, padded with 0
    seq_lens: torch.Tensor  # (S,) int32: context length of each sequence including this step's tokens
    query_start_loc: torch.Tensor  # (S + 1,) int32: row offsets of each sequence's queries
    kv_layout: KVLayout
    # CUDA launch parameters (the Triton kernels size their grids with them; unpadded batches only)
    num_decodes: int = 0
    max_decode_seq_len: int = 1  # the longest decode context: sizes the Triton decode split
    # CPU compiled decode-only step (one query per sequence, token rows == sequence rows, block tables cut
    # to one width): attention in plain torch ops that inductor fuses (kernels.attention_graph)
    decode_graph: bool = False


class Attention(nn.Module):
    """Stores this step's K/V into the layer's cache, then attends over each sequence's whole context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        # decided once, outside any traced code (the check builds and loads the native library)
        self.native_decode = cpu_native.attention_available()

    def forward(
        self,
        q: torch.Tensor,  # (T, Hq, D), RoPE applied
        k: torch.Tensor,  # (T, Hkv, D), RoPE applied
        v: torch.Tensor,  # (T, Hkv, D)
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        layout = meta.kv_layout
        if q.is_cuda:
            from qserve.kernels.paged_attention import paged_attention_triton, store_kv_triton, supports

            if supports(layout):
                store_kv_triton(k, v, kv_cache, meta.slot_mapping, layout)
                return paged_attention_triton(
                    q,
                    kv_cache,
                    meta.block_tables,
                    meta.seq_lens,
                    meta.query_start_loc,
                    meta.num_decodes,
                    self.scale,
                    layout,
                    self.sliding_window,
                    max_seq_len=meta.max_decode_seq_len,
                )
        if meta.decode_graph:
            if self.native_decode:
                # one native call per layer: store, then attend from the codes (kernels/cpu_attention.cpp)
                return cpu_native.decode_attention(
                    q,
                    k,
                    v,
                    kv_cache,
                    meta.slot_mapping,
                    meta.block_tables,
                    meta.seq_lens,
                    self.scale,
                    layout.block_size,
                    layout.head_dim,
                    layout.bits,
                    self.sliding_window or 0,
                )
            store_kv_graph(k, v, kv_cache, meta.slot_mapping, layout)
            return decode_attention_graph(
                q, kv_cache, meta.block_tables, meta.seq_lens, self.scale, layout, self.sliding_window or 0
            )
        return paged_attention_cpu_op(
            q,
            k,
            v,
            kv_cache,
            meta.slot_mapping,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
            layout.block_size,
            layout.head_dim,
            layout.bits,
            self.sliding_window or 0,
        )
