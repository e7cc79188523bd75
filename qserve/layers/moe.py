"""Mixture-of-experts layers: the router's top-k (:func:`route`) and the experts (:class:`FusedMoE`).

``FusedMoE`` holds all experts of one layer stacked: ``w13`` (E, 2I, H) = each expert's [gate; up] and
``w2`` (E, H, I), in the model dtype, or int4 / int8 (qserve's layout per expert, re-packed once at load for
the backend, as :class:`qserve.layers.quant_linear.QuantLinear` does). Its forward is one call of the grouped
``qserve::moe_experts`` op (:mod:`qserve.kernels.moe`).

Checkpoint names it loads (relative to the experts module, see :meth:`FusedMoE.load_named`):
``{e}.gate_proj|up_proj|down_proj.<suffix>`` (Qwen-MoE), ``{e}.w1|w3|w2.<suffix>`` (Mixtral; w1 = gate,
w3 = up, w2 = down), with suffix ``weight`` or the quantized layout's tensors (qweight, scales, qzeros[, g_idx]),
and transformers v5's fused float tensors ``gate_up_proj`` (E, 2I, H) / ``down_proj`` (E, H, I).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from qserve.errors import QServeError
from qserve.kernels.moe import moe_experts, moe_experts_packed
from qserve.kernels.packing import QuantizedWeight, QuantSpec, quantize
from qserve.layers.quant_linear import cpu_int4_ok, pack_cpu_int4

_CPU_DTYPE = torch.bfloat16
_EXPERT_NAME = re.compile(r"^(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.(\w+)$")
_PROJ = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": 2, "w2": 2}  # -> gate, up, down


def route(
    logits: torch.Tensor, top_k: int, renormalize: bool, weights_in_float32: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing exactly as Mixtral / Qwen-MoE do it in transformers.

    ``p = softmax(logits.float())``, ``topk(p, top_k)`` (torch's tie order), divided by its sum when
    ``renormalize``; cast back to the logits' dtype unless ``weights_in_float32`` (Mixtral keeps float32).
    Rows are independent: a padded row routes somewhere harmless and never affects another row.

    Args:
        logits: (T, E) router logits in the model dtype.

    Returns:
        (topk_ids int64 (T, top_k), topk_weights (T, top_k)).
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (T, E) float32
    weights, ids = torch.topk(probs, top_k, dim=-1)  # (T, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if not weights_in_float32:
        weights = weights.to(logits.dtype)
    return ids, weights


class FusedMoE(nn.Module):
    """All experts of one MoE layer; ``forward(x (T, H), topk_ids, topk_weights) -> (T, H)``.

    Invariants: after :meth:`load_named`, ``kind`` is "float", "cpu-int4", "cpu-int8", "int4" or "int8" (the
    :mod:`qserve.kernels.moe` layout of ``w13``/``w2`` and their scales/zeros), and every expert was filled;
    :meth:`prepack_cpu_experts` turns bf16 "float" experts on CPU into "cpu-bf16" (``w13_packed``/``w2_packed``).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        quant: QuantSpec | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.inter = num_experts, hidden_size, intermediate_size
        self.quant, self.dtype, self.device = quant, dtype, torch.device(device)
        self.kind = "unloaded"
        self.group_size = -1
        self.w13: torch.Tensor | None = None
        self.w2: torch.Tensor | None = None
        self.w13_scales: torch.Tensor | None = None
        self.w2_scales: torch.Tensor | None = None
        self.w13_zeros: torch.Tensor | None = None
        self.w2_zeros: torch.Tensor | None = None
        self.w13_packed: list[torch.Tensor] = []  # kind "cpu-bf16": one oneDNN-packed tensor per expert
        self.w2_packed: list[torch.Tensor] = []

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden}, intermediate={self.inter}, kind={self.kind}"

    # ------------------------------------------------------------------------------------------ load

    def load_named(self, tensors: dict[str, torch.Tensor]) -> None:
        """Fill every expert from checkpoint tensors named relative to this module (module docstring)."""
        e_count, h, i = self.num_experts, self.hidden, self.inter
        quant = self._expert_quant(tensors)
        parts: list[list[dict[str, torch.Tensor]]] = [[{}, {}, {}] for _ in range(e_count)]
        fused: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            m = _EXPERT_NAME.match(name)
            if m is None:
                if name not in ("gate_up_proj", "down_proj"):
                    raise QServeError(f"unexpected expert tensor {name!r}")
                fused[name] = t
                continue
            e = int(m[1])
            if e >= e_count:
                raise QServeError(f"expert {e} in the checkpoint, but the config has {e_count} experts")
            parts[e][_PROJ[m[2]]][m[3]] = t
        if fused:
            self._load_fused(fused, quant)
            return
        for e, p in enumerate(parts):
            missing = [n for n, d in zip(("gate", "up", "down"), p, strict=True) if not d]
            if missing:
                raise QServeError(f"checkpoint lacks the {missing[0]} projection of expert {e}")
        if quant is None:
            w13 = torch.stack([torch.cat([p[0]["weight"], p[1]["weight"]]) for p in parts])  # (E, 2I, H)
            w2 = torch.stack([p[2]["weight"] for p in parts])  # (E, H, I)
            self._set_float(w13, w2)
            return
        q13 = [QuantizedWeight.cat([self._to_qserve(p[0]), self._to_qserve(p[1])]) for p in parts]
        q2 = [self._to_qserve(p[2]) for p in parts]
        for qw, (n, k) in [(q13[0], (2 * i, h)), (q2[0], (h, i))]:
            if (qw.out_features, qw.in_features) != (n, k):
                raise QServeError(f"expert weight is {qw.out_features}x{qw.in_features}, expected {n}x{k}")
        self.set_quantized(q13, q2)

    def _expert_quant(self, tensors: dict[str, torch.Tensor]) -> QuantSpec | None:
        """The spec the experts are stored in: the model's, except in a bitsandbytes checkpoint, whose float
        experts stay float (transformers v5 quantizes only ``nn.Linear`` modules, never its fused expert
        parameters, and computes them in float); bnb int8 experts (weight + SCB) load as qserve int8."""
        if self.quant is None or self.quant.source != "bnb":
            return self.quant
        if any(n.endswith(("absmax", "quant_map", "quant_state")) or ".weight." in n for n in tensors):
            raise QServeError(
                f"bitsandbytes {self.quant.weights} expert weights (saved per expert by transformers < 5) are "
                "not supported: serve the float checkpoint, or `qserve convert` it to int4/int8"
            )
        if all(t.is_floating_point() for n, t in tensors.items() if n.endswith(("weight", "proj"))):
            return None
        if self.quant.weights != "int8":
            raise QServeError(
                f"unexpected non-float expert weights in a bitsandbytes {self.quant.weights} checkpoint"
            )
        return self.quant

    def _load_fused(self, fused: dict[str, torch.Tensor], quant: QuantSpec | None) -> None:
        if set(fused) != {"gate_up_proj", "down_proj"}:
            raise QServeError(f"fused expert tensors need gate_up_proj and down_proj, got {sorted(fused)}")
        w13, w2 = fused["gate_up_proj"], fused["down_proj"]
        if quant is None:
            self._set_float(w13, w2)
            return
        q13 = [self._quantize(w) for w in w13]  # a float checkpoint served quantized: RTN here
        self.set_quantized(q13, [self._quantize(w) for w in w2])

    def _to_qserve(self, shard: dict[str, torch.Tensor]) -> QuantizedWeight:
        assert self.quant is not None
        if "qweight" not in shard and "weight" in shard and shard["weight"].is_floating_point():
            return self._quantize(shard["weight"])
        try:
            return self.quant.to_qserve(shard)
        except (KeyError, ValueError) as e:
            raise QServeError(f"bad quantized expert weights ({self.quant.source}): {e}") from None

    def _quantize(self, w: torch.Tensor) -> QuantizedWeight:
        assert self.quant is not None
        return quantize(w, self.quant.weights, self.quant.group_size, scale_dtype=w.dtype)

    def _set_float(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        e, h, i = self.num_experts, self.hidden, self.inter
        if tuple(w13.shape) != (e, 2 * i, h) or tuple(w2.shape) != (e, h, i):
            raise QServeError(
                f"expert weights {tuple(w13.shape)} / {tuple(w2.shape)} do not match "
                f"({e}, {2 * i}, {h}) / ({e}, {h}, {i})"
            )
        self.kind = "float"
        self.w13 = w13.to(self.device, self.dtype).contiguous()
        self.w2 = w2.to(self.device, self.dtype).contiguous()

    def set_quantized(
        self, q13: list[QuantizedWeight], q2: list[QuantizedWeight], keep_layout: bool = False
    ) -> None:
        """Install per-expert QuantizedWeights (gate+up fused, down), re-packed for this device.

        ``keep_layout`` keeps qserve's own layout even on CPU (the path other devices take; for tests).
        """
        weights, group = q13[0].weights, q13[0].group_size
        self.group_size = group
        self.w13_scales = self.w2_scales = self.w13_zeros = self.w2_zeros = None
        on_cpu = self.device.type == "cpu" and not keep_layout
        if on_cpu and weights == "int4" and cpu_int4_ok(group):
            self.kind = "cpu-int4"
            packed13 = [pack_cpu_int4(q) for q in q13]
            packed2 = [pack_cpu_int4(q) for q in q2]
            self.w13 = torch.stack([p for p, _ in packed13])  # (E, N13', H/2)
            self.w13_scales = torch.stack([s for _, s in packed13])  # (E, H/G, N13', 2)
            self.w2 = torch.stack([p for p, _ in packed2])  # (E, N2', I/2)
            self.w2_scales = torch.stack([s for _, s in packed2])  # (E, I/G, N2', 2)
        elif on_cpu and weights == "int8":
            self.kind = "cpu-int8"
            self.w13 = torch.stack([q.qweight for q in q13])  # int8 (E, 2I, H), a fresh aligned copy
            self.w13_scales = torch.stack([q.scales for q in q13]).to(_CPU_DTYPE)  # (E, 2I)
            self.w2 = torch.stack([q.qweight for q in q2])  # int8 (E, H, I)
            self.w2_scales = torch.stack([q.scales for q in q2]).to(_CPU_DTYPE)  # (E, H)
        else:  # qserve's layout as stored: Triton per expert on CUDA, the reference elsewhere
            self.kind = weights
            dev = self.device
            self.w13 = torch.stack([q.qweight for q in q13]).to(dev)
            self.w2 = torch.stack([q.qweight for q in q2]).to(dev)
            self.w13_scales = torch.stack([q.scales for q in q13]).to(dev)
            self.w2_scales = torch.stack([q.scales for q in q2]).to(dev)
            if weights == "int4":
                self.w13_zeros = torch.stack([q.zeros for q in q13 if q.zeros is not None]).to(dev)
                self.w2_zeros = torch.stack([q.zeros for q in q2 if q.zeros is not None]).to(dev)

    def prepack_cpu_experts(self) -> int:
        """bf16 float experts on CPU -> kind "cpu-bf16": each expert's weights reordered once into oneDNN's
        blocked layout (as :meth:`qserve.layers.linear.Linear.prepack_cpu`; otherwise oneDNN reorders them on
        every call). The stacked weights are released. Returns how many experts were packed (0: not eligible).
        """
        if self.kind != "float" or self.w13 is None or self.w2 is None:
            return 0
        if (
            self.device.type != "cpu"
            or self.w13.dtype != torch.bfloat16
            or not torch.backends.mkldnn.is_available()
        ):
            return 0
        reorder = torch.ops.mkldnn._reorder_linear_weight
        self.w13_packed = [reorder(self.w13[e].contiguous(), 64) for e in range(self.num_experts)]
        self.w2_packed = [reorder(self.w2[e].contiguous(), 64) for e in range(self.num_experts)]
        self.w13 = self.w2 = None
        self.kind = "cpu-bf16"
        return self.num_experts

    @property
    def nbytes(self) -> int:
        """Bytes the experts hold on their device, as loaded."""
        ts = (self.w13, self.w2, self.w13_scales, self.w2_scales, self.w13_zeros, self.w2_zeros)
        packed = [*self.w13_packed, *self.w2_packed]
        return sum(t.numel() * t.element_size() for t in [*ts, *packed] if t is not None)

    # --------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x (T, H), topk_ids / topk_weights (T, top_k) -> (T, H) in x's dtype."""
        if self.kind == "cpu-bf16":
            return moe_experts_packed(x, topk_ids, topk_weights, self.w13_packed, self.w2_packed, self.inter)
        if self.w13 is None or self.w2 is None:
            raise RuntimeError("FusedMoE used before load_named()")
        return moe_experts(
            x,
            topk_ids,
            topk_weights,
            self.w13,
            self.w2,
            kind=self.kind,
            inter=self.inter,
            w13_scales=self.w13_scales,
            w2_scales=self.w2_scales,
            w13_zeros=self.w13_zeros,
            w2_zeros=self.w2_zeros,
            group_size=self.group_size,
        )
