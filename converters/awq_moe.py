"""--method awq for the MLP of an MoE layer, with per-expert calibration statistics from the model's routing.

Each expert's statistics come only from the calibration tokens the model's own router sends to it (the
float layer's top-k, :func:`qserve.layers.moe.route`). Where 1/s folds exactly decides the groups:

* Gate/up of every expert, the shared expert's gate/up (Qwen2-MoE), the router and the shared expert's
  sigmoid gate all read one tensor, the post-attention RMSNorm's output x. A scale per expert cannot be
  folded there (one norm gain feeds every expert), so one scale s (H,) is searched for the layer: every
  consumer's columns are multiplied by s and the norm's gain divided by s. The router and the shared-expert
  gate stay float with their columns times s, so their logits, and the routing, are unchanged (up to float
  rounding). The search minimises the mean, over the quantized consumers, of each one's relative output
  error on the tokens it actually sees (expert e: the tokens whose top-k holds e; the shared expert: all),
  among the candidates that leave no consumer worse than RTN on its tokens (s = 1 is always one).
* Down of expert e reads ``silu(x W1_e^T) * (x W3_e^T)`` of its own tokens only: its scale is searched per
  expert on those tokens, and 1/s folds exactly into the rows of that expert's up projection (the product
  is linear in up's output). The shared expert's down folds into its up the same way.

An expert that no calibration token reaches still takes the layer's s on gate/up (it must) and is RTN on
down; its report entries say ``tokens: 0`` and carry no output errors. Clipping, as for dense layers, is
searched per linear on its own tokens and kept only where it lowers that linear's error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qserve.config import MoEConfig
from qserve.converters.awq import SEARCH_TOKENS, Group, apply_group, clip_if_better
from qserve.converters.awq_search import fake_quant, output_error, scale_candidates
from qserve.converters.plan import Target
from qserve.converters.report import Report
from qserve.converters.stream import SourceCheckpoint
from qserve.errors import QServeError

_FUSED = (".experts.gate_up_proj", ".experts.down_proj")  # transformers v5's stacked float experts


@dataclass(frozen=True)
class MoENames:
    """Full module names of one sparse layer's MLP (weights are ``{name}.weight``)."""

    router: str
    experts: tuple[tuple[str, str, str], ...]  # per expert (gate, up, down): Mixtral (w1, w3, w2)
    shared: tuple[str, str, str] | None  # Qwen2-MoE's shared expert (gate, up, down)
    shared_gate: str | None  # its sigmoid gate (1, H), float


def check_moe_layout(ckpt: SourceCheckpoint) -> None:
    """Refuse (before anything is written) experts stored stacked: AWQ scales and writes them per expert."""
    fused = next((n for n in ckpt.tensors if n.removesuffix(".weight").endswith(_FUSED)), None)
    if fused is not None:
        raise QServeError(
            f"--method awq needs per-expert tensors (experts.{{e}}.*_proj), but {fused} stacks all experts: "
            "use --method rtn"
        )


def moe_names(prefix: str, tensors: dict[str, torch.Tensor], num_experts: int) -> MoENames:
    """The sparse MLP's module names under layer ``prefix``, checked against ``tensors``."""
    mixtral = f"{prefix}.block_sparse_moe.gate.weight" in tensors
    block = f"{prefix}.block_sparse_moe" if mixtral else f"{prefix}.mlp"
    leaves = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    experts = tuple(
        (
            f"{block}.experts.{e}.{leaves[0]}",
            f"{block}.experts.{e}.{leaves[1]}",
            f"{block}.experts.{e}.{leaves[2]}",
        )
        for e in range(num_experts)
    )
    wanted = [f"{block}.gate", *(m for ex in experts for m in ex)]
    missing = [f"{m}.weight" for m in wanted if f"{m}.weight" not in tensors]
    if missing:
        raise QServeError(f"--method awq: the MoE layer {prefix} has no {missing[0]}")
    has_shared = f"{block}.shared_expert.gate_proj.weight" in tensors
    shared = tuple(f"{block}.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
    shared_gate = f"{block}.shared_expert_gate"
    return MoENames(
        f"{block}.gate",
        experts,
        (shared[0], shared[1], shared[2]) if has_shared else None,
        shared_gate if f"{shared_gate}.weight" in tensors else None,
    )


def apply_moe(
    moe: MoEConfig,
    prefix: str,
    tensors: dict[str, torch.Tensor],
    x: torch.Tensor,
    target: Target,
    report: Report,
) -> None:
    """Scale, fold and clip one sparse layer's MLP in ``tensors`` (module docstring), given x (T, H)."""
    from qserve.layers.moe import route

    names = moe_names(prefix, tensors, moe.num_experts)
    x = x.float()  # (T, H): the block's input, every calibration token
    w = {m: tensors[f"{m}.weight"].float() for ex in (*names.experts, names.shared or ()) for m in ex}
    scale_dtype = tensors[f"{names.experts[0][0]}.weight"].dtype
    ids, _ = route(x @ tensors[f"{names.router}.weight"].float().t(), moe.top_k, moe.norm_topk_prob, True)
    rows = [(ids == e).any(-1).nonzero().squeeze(1) for e in range(moe.num_experts)]  # tokens per expert
    # Down projections' inputs from the float weights, before gate/up are scaled.
    pairs = [(ex, x[r]) for ex, r in zip(names.experts, rows, strict=True)]
    if names.shared is not None:
        pairs.append((names.shared, x))
    down_x = {d: F.silu(xe @ w[g].t()) * (xe @ w[u].t()) for (g, u, d), xe in pairs}  # (T_e, I) each

    # ---------------------------------------------------------------- one scale for every reader of x
    consumers = [(m, xe) for (g, u, _), xe in pairs for m in (g, u)]  # (module, its tokens' x)
    searched = [(_rows(xe), w[m]) for m, xe in consumers]
    s, alpha = search_shared_scale(searched, x.abs().mean(0), target, scale_dtype)
    for (m, full), (xe, _) in zip(consumers, searched, strict=True):
        entry: dict[str, object] = {"tokens": int(full.shape[0]), "alpha": alpha}
        if xe.shape[0] == 0:
            tensors[f"{m}.weight"] = w[m] * s
            report.add(m, {**entry, "clipped_fraction": 0.0})
            continue
        w_s, err = clip_if_better(m, xe, w[m], s, target, scale_dtype)
        tensors[f"{m}.weight"] = w_s
        report.add(m, {
            **entry,
            "clipped_fraction": float((w_s != w[m] * s).float().mean()),
            "rtn_output_error": output_error(xe, w[m], fake_quant(w[m], target, scale_dtype)),
            "awq_output_error": err,
        })  # fmt: skip
    norm = f"{prefix}.post_attention_layernorm.weight"
    tensors[norm] = (tensors[norm].float() / s).to(tensors[norm].dtype)
    for gate in (names.router, names.shared_gate):  # float readers of x: columns x s, their own dtype
        if gate is not None:
            t = tensors[f"{gate}.weight"]
            tensors[f"{gate}.weight"] = (t.float() * s).to(t.dtype)

    # ---------------------------------------------------------------- down, per expert, 1/s into up
    for (_, u, d), xe in pairs:
        if xe.shape[0] == 0:
            report.add(d, {"tokens": 0})
            continue
        rel = len(prefix) + 1
        group = Group(u[rel:], (d[rel:],), "")
        apply_group(group, prefix, tensors, down_x[d], target, report, {"tokens": int(xe.shape[0])})


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x[:: max(1, x.shape[0] // SEARCH_TOKENS)]  # the rows the searches use, as for dense groups


def search_shared_scale(
    consumers: list[tuple[torch.Tensor, torch.Tensor]],
    x_mean: torch.Tensor,
    target: Target,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, float]:
    """One input scale s (K,) for linears (x_i (M_i, K), w_i (N_i, K)) that read the same tensor.

    Minimises the mean relative output error of the consumers with tokens, each on its own x_i, over the
    candidates of :func:`qserve.converters.awq_search.scale_candidates` (from ``x_mean`` (K,), mean |x| over
    all tokens, and all weights), skipping any candidate that makes one consumer worse than RTN.
    Returns (s, alpha); alpha is -1 when s = 1 won.
    """
    live = [(x, w) for x, w in consumers if x.shape[0] > 0]
    if not live:
        return torch.ones_like(x_mean), -1.0

    def errors(s: torch.Tensor) -> list[float]:
        return [output_error(x, w, fake_quant(w * s, target, scale_dtype) / s) for x, w in live]

    ones = torch.ones_like(x_mean)
    rtn = errors(ones)
    best, best_loss, best_alpha = ones, sum(rtn) / len(rtn), -1.0
    for a, s in scale_candidates(x_mean, torch.cat([w for _, w in consumers]), target):
        errs = errors(s)
        if any(e > r for e, r in zip(errs, rtn, strict=True)):
            continue
        loss = sum(errs) / len(errs)
        if loss < best_loss:
            best, best_loss, best_alpha = s, loss, a
    return best, best_alpha
