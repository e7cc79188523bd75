"""Attention over the paged KV cache, and the metadata that describes a packed batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qserve.kernels.attention import DecodePlan, KVLayout, paged_attention_cpu, store_kv


@dataclass
class AttentionMetadata:
    """Everything attention needs about one packed batch; built by the ModelRunner, passed explicitly.

    Sequences are ordered decodes first: the first ``num_decodes`` have exactly one query token.
    Device tensors are for kernels; host lists avoid device syncs in the CPU path's Python loop.
    """

    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each new token
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with 0
    seq_lens: list[int]  # B: context length of each sequence including this step's tokens
    query_start_loc: list[int]  # B + 1: row offsets of each sequence's queries in the packed batch
    num_decodes: int
    kv_layout: KVLayout
    # device copies for the Triton kernels (CUDA only; None on CPU)
    seq_lens_tensor: torch.Tensor | None = None  # (B,) int32
    query_start_loc_tensor: torch.Tensor | None = None  # (B + 1,) int32
    max_decode_seq_len: int = 1  # the longest decode context: sizes the Triton decode split (CUDA)
    # CPU: the decode gather rows and mask, built by the first layer and reused by the rest of this step
    cpu_plans: dict[tuple[int, ...], DecodePlan] = field(default_factory=dict)


class Attention(nn.Module):
    """Stores this step's K/V into the layer's cache, then attends over each sequence's whole context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window

    def forward(
        self,
        q: torch.Tensor,  # (T, Hq, D), RoPE applied
        k: torch.Tensor,  # (T, Hkv, D), RoPE applied
        v: torch.Tensor,  # (T, Hkv, D)
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        if q.is_cuda and meta.seq_lens_tensor is not None and meta.query_start_loc_tensor is not None:
            from qserve.kernels.paged_attention import paged_attention_triton, store_kv_triton, supports

            if supports(meta.kv_layout):
                store_kv_triton(k, v, kv_cache, meta.slot_mapping, meta.kv_layout)
                return paged_attention_triton(
                    q,
                    kv_cache,
                    meta.block_tables,
                    meta.seq_lens_tensor,
                    meta.query_start_loc_tensor,
                    meta.num_decodes,
                    self.scale,
                    meta.kv_layout,
                    self.sliding_window,
                    max_seq_len=meta.max_decode_seq_len,
                )
        store_kv(k, v, kv_cache, meta.slot_mapping, meta.kv_layout)
        return paged_attention_cpu(
            q,
            kv_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            meta.num_decodes,
            self.scale,
            meta.kv_layout,
            self.sliding_window,
            new_kv=(k, v),
            plans=meta.cpu_plans,
        )
