"""The sparse MoE MLP block of Mixtral, Qwen2-MoE and Qwen3-MoE, on :mod:`qserve.layers.moe`.

Module names follow transformers v5 (``mlp.gate`` the router, ``mlp.experts``, Qwen2-MoE's
``mlp.shared_expert`` and ``mlp.shared_expert_gate``); Mixtral checkpoints' ``block_sparse_moe`` is read
as ``mlp`` by the loader (:data:`CHECKPOINT_RENAMES`). The router and the shared expert's gate stay in
float even in quantized checkpoints (as vLLM and AutoAWQ keep them): they are tiny and set the routing.
bitsandbytes checkpoints are read as transformers v5 writes them: router and experts float (they are not
``nn.Linear`` modules there), the shared expert and its gate quantized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qserve.config import ModelConfig, MoEConfig
from qserve.layers.linear import make_linear
from qserve.layers.moe import FusedMoE, route

if TYPE_CHECKING:
    from qserve.kernels.packing import QuantSpec

CHECKPOINT_RENAMES = ((".block_sparse_moe.", ".mlp."),)  # checkpoint substring -> ours (Mixtral)


class SparseMoeBlock(nn.Module):
    """``y = sum_j w_j Expert_j(x)`` over the router's top-k, plus Qwen2-MoE's sigmoid-gated shared expert."""

    def __init__(
        self,
        cfg: ModelConfig,
        moe: MoEConfig,
        quant: QuantSpec | None,
        dtype: torch.dtype,
        device: torch.device,
        dense_mlp: type[nn.Module],
    ):
        super().__init__()
        self.moe = moe
        self.gate = make_linear(cfg.hidden_size, moe.num_experts, False, None, dtype, device)  # the router
        self.experts = FusedMoE(moe.num_experts, cfg.hidden_size, moe.intermediate_size, quant, dtype, device)
        self.shared_expert: nn.Module | None = None
        self.shared_expert_gate: nn.Module | None = None
        if moe.shared_expert_intermediate_size:
            inter = moe.shared_expert_intermediate_size
            self.shared_expert = dense_mlp(cfg, quant, dtype, device, inter)
            # qserve keeps this (1, H) gate float; bitsandbytes quantizes it like any nn.Linear (so we read it)
            gate_quant = quant if quant is not None and quant.source == "bnb" else None
            self.shared_expert_gate = make_linear(cfg.hidden_size, 1, False, gate_quant, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, H) -> (T, H). Tensor ops and one custom op: no data-dependent Python control flow."""
        m = self.moe
        ids, weights = route(self.gate(x), m.top_k, m.norm_topk_prob, m.weights_in_float32)  # (T, k) each
        y = self.experts(x, ids, weights)  # (T, H)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            y = y + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # gate (T, 1)
        return y
