"""Activation-aware quantization (AWQ-style): per-input-channel scales searched on calibration text.

For each decoder layer, in order and with only that layer's weights in memory:

1. run the float layer (qserve's own LlamaDecoderLayer, with plain causal attention in place of the
   paged one) on the calibration hidden states, capturing the input X of each linear group;
2. for each group of linears that share an input and whose producer can absorb a scale - q/k/v after
   input_layernorm, gate/up after post_attention_layernorm, down_proj after up_proj, o_proj after
   v_proj (under GQA with one scale per v_proj row) - search per-input-channel scales s
   (converters/awq_search.py), multiply W's columns by s and fold 1/s into the producer (RMSNorm gain
   or linear rows: exact in float);
3. clip each quantization group's range where that lowers the output error (not for q/k, whose errors
   the softmax amplifies), then round to nearest. The next layer's input is the float layer's output.

The report gets, per linear, the relative output error on calibration activations of plain RTN and of
the searched weights (``rtn_output_error`` / ``awq_output_error``), the chosen alpha and clipping.
The MLP of an MoE layer (experts, router, shared expert) is scaled by :mod:`qserve.converters.awq_moe`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qserve.config import ModelConfig
from qserve.converters.awq_search import fake_quant, output_error, search_clip, search_scale
from qserve.converters.plan import LINEAR_LEAVES, Target, Unit
from qserve.converters.report import Report
from qserve.converters.stream import ShardedWriter, SourceCheckpoint
from qserve.errors import QServeError

MAX_TOKENS = 8192  # calibration tokens (sequences x length)
SEQ_LEN = 512
SEARCH_TOKENS = 2048  # rows of X used in the scale search
NO_CLIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class Group:
    """Linears that read the same input X, and the producer of X that absorbs 1/s."""

    prev: str  # "input_layernorm" | "post_attention_layernorm" | "self_attn.v_proj" | "mlp.up_proj"
    linears: tuple[str, ...]  # e.g. ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    captured: str  # the runtime module whose input is X: qkv_proj, o_proj, gate_up_proj, down_proj
    tie: tuple[int, int, int] | None = None  # GQA o_proj: (kv_heads, q heads per kv head, head_dim)


def groups(cfg: ModelConfig, sparse: bool = False) -> list[Group]:
    """The scaled groups of one decoder layer; a ``sparse`` (MoE) layer's MLP is left to converters/awq_moe.py."""
    # Under GQA one v_proj row feeds `group` o_proj columns (one per query head of its KV group), so
    # those columns must share a scale for 1/s to fold into v_proj exactly.
    group = cfg.num_heads // cfg.num_kv_heads
    tie = (cfg.num_kv_heads, group, cfg.head_dim) if group > 1 else None
    attention = [
        Group(
            "input_layernorm",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "self_attn.qkv_proj",
        ),
        Group("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", tie),
    ]
    if sparse:
        return attention
    return [
        *attention,
        Group("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp.gate_up_proj"),
        Group("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    ]


def calibration_ids(
    src_dir: Path, text: str, max_tokens: int | None = None, seq_len: int | None = None
) -> torch.Tensor:
    """(S, T) token ids: the calibration text cut into S windows of T tokens (defaults: module constants)."""
    from qserve.tokenizer import load_tokenizer

    max_tokens, seq_len = max_tokens or MAX_TOKENS, seq_len or SEQ_LEN
    ids = list(load_tokenizer(src_dir).encode(text))
    seq_len = min(seq_len, max(16, len(ids) // 4))
    n = min(len(ids) // seq_len, max(1, max_tokens // seq_len))
    if n < 1 or seq_len < 16:
        raise QServeError(f"calibration text is too short ({len(ids)} tokens; need at least 64)")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def run_awq(
    src_dir: Path,
    cfg: ModelConfig,
    ckpt: SourceCheckpoint,
    units: list[Unit],
    target: Target,
    writer: ShardedWriter,
    report: Report,
    calib_text: str,
    advance: Callable[[int, str], None],
) -> None:
    """Quantize ``units`` with activation-aware scales and clipping, writing them in plan order."""
    from qserve.converters.awq_moe import apply_moe
    from qserve.converters.convert import process_unit, write_unit

    ids = calibration_ids(src_dir, calib_text)
    report.settings["calibration"] = {"sequences": ids.shape[0], "seq_len": ids.shape[1]}
    embed_name = next((n for n in ckpt.tensors if n.endswith("embed_tokens.weight")), None)
    if embed_name is None:
        raise QServeError("--method awq needs the embedding (embed_tokens.weight) in the checkpoint")
    h = ckpt.read(embed_name).float()[ids]  # (S, T, H)
    for unit in units:  # embeddings, final norm, lm_head: the plan puts them first
        if unit.layer is None:
            tensors = {s: ckpt.read(n) for s, n in unit.inputs.items()}
            write_unit(unit, process_unit(unit, tensors, target, report), writer)
            advance(unit.source_bytes, unit.module)
    runner = _LayerRunner(cfg, ids.shape[1])
    for layer_idx in sorted({u.layer for u in units if u.layer is not None}):
        layer_units = [u for u in units if u.layer == layer_idx]
        names = [n for u in layer_units for n in u.inputs.values()]
        tensors = {n: ckpt.read(n) for n in names}  # this layer's source tensors, by full name
        prefix = names[0][: names[0].index(f".layers.{layer_idx}.")] + f".layers.{layer_idx}"
        sparse = cfg.moe is not None and layer_idx in cfg.moe.sparse_layers
        inputs, h_next = runner.run(prefix, tensors, h, layer_idx)
        for group in groups(cfg, sparse):
            apply_group(group, prefix, tensors, inputs[group.captured], target, report)
        if sparse:
            assert cfg.moe is not None
            apply_moe(cfg.moe, prefix, tensors, inputs["mlp"], target, report)
        for unit in layer_units:
            outputs = process_unit(unit, {s: tensors[n] for s, n in unit.inputs.items()}, target, report)
            write_unit(unit, outputs, writer)
            advance(unit.source_bytes, unit.module)
        h = h_next


def apply_group(
    group: Group,
    prefix: str,
    tensors: dict[str, torch.Tensor],
    x: torch.Tensor,
    target: Target,
    report: Report,
    note: dict[str, Any] | None = None,
) -> None:
    """Search and apply scales (folding 1/s into the producer) and clipping for one group, in ``tensors``.

    Clipping is kept only where it lowers the linear's output error on ``x`` (groups are clipped one by
    one, so their errors could add up), so each linear ends no worse than its scaled, unclipped weight,
    which is no worse than RTN (s = 1 is a candidate). ``note`` is added to each linear's report entry.
    """
    names = [f"{prefix}.{lin}.weight" for lin in group.linears]
    if any(n not in tensors for n in names):
        return
    scale_dtype = tensors[names[0]].dtype
    x = x[:: max(1, x.shape[0] // SEARCH_TOKENS)]  # (M, K)
    ws = {n: tensors[n].float() for n in names}  # (N_i, K) each
    s, alpha = search_scale(x, torch.cat(list(ws.values())), target, scale_dtype, group.tie)
    for n, w in ws.items():
        module = n.removesuffix(".weight")
        w_s, err = clip_if_better(module, x, w, s, target, scale_dtype)
        report.add(module, {
            **(note or {}),
            "alpha": alpha,
            "clipped_fraction": float((w_s != w * s).float().mean()),
            "rtn_output_error": output_error(x, w, fake_quant(w, target, scale_dtype)),
            "awq_output_error": err,
        })  # fmt: skip
        tensors[n] = w_s
    s_prev = s if group.tie is None else s.view(*group.tie)[:, 0].reshape(-1)  # GQA: one per v_proj row
    for suffix in ("weight", "bias"):
        prev = f"{prefix}.{group.prev}.{suffix}"
        if prev not in tensors:
            continue
        t = tensors[prev].float()
        t = (
            t / s_prev if t.dim() == 1 else t / s_prev[:, None]
        )  # RMSNorm gain, or the producing linear's rows
        linear_weight = suffix == "weight" and group.prev.rpartition(".")[2] in LINEAR_LEAVES
        tensors[prev] = t if linear_weight else t.to(tensors[prev].dtype)  # copied tensors keep their dtype


def clip_if_better(
    module: str, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, target: Target, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, float]:
    """``w * s`` (N, K), clipped (not q/k) where that lowers the output error on x; and that error."""
    w_s = w * s  # columns x s, kept in float32 until quantized
    err = output_error(x, w, fake_quant(w_s, target, scale_dtype) / s)
    if not module.endswith(NO_CLIP) and x.shape[0] > 0:
        clipped = search_clip(x / s, w_s, target, scale_dtype)
        clipped_err = output_error(x, w, fake_quant(clipped, target, scale_dtype) / s)
        if clipped_err <= err:
            return clipped, clipped_err
    return w_s, err


class _LayerRunner:
    """Runs one float decoder layer of qserve's model on packed calibration sequences, capturing inputs."""

    def __init__(self, cfg: ModelConfig, seq_len: int) -> None:
        from qserve.layers.rotary import RotaryEmbedding

        self.cfg, self.seq_len = cfg, seq_len
        self.rotary = RotaryEmbedding(cfg.head_dim, max(seq_len, cfg.max_position_embeddings), cfg.rope)

    def run(
        self, prefix: str, tensors: dict[str, torch.Tensor], h: torch.Tensor, layer_idx: int = 0
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Run layer ``layer_idx`` (its source tensors by full name, under ``prefix``) on h (S, T, H).

        Returns the captured inputs by runtime module (each group's ``captured``, and ``mlp``: the MoE
        block's input in a sparse layer), rows in (sequence, position) order, and the layer's output.
        """
        from qserve.models.llama import FUSED_PROJECTIONS, LlamaDecoderLayer
        from qserve.models.moe import CHECKPOINT_RENAMES

        cfg, (s, t, _) = self.cfg, h.shape
        layer = LlamaDecoderLayer(cfg, self.rotary, None, torch.float32, torch.device("cpu"), layer_idx)
        sparse = cfg.moe is not None and layer_idx in cfg.moe.sparse_layers
        modules, params = dict(layer.named_modules()), dict(layer.named_parameters())
        shards: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        experts: dict[str, torch.Tensor] = {}  # relative to mlp.experts, for FusedMoE.load_named
        for name, tensor in tensors.items():
            rel = name[len(prefix) + 1 :]
            for old, new in CHECKPOINT_RENAMES:  # Mixtral's block_sparse_moe -> mlp
                rel = rel.replace(old.lstrip("."), new.lstrip("."))
            if rel.startswith("mlp.experts."):
                experts[rel.removeprefix("mlp.experts.")] = tensor.float()
                continue
            module, _, suffix = rel.rpartition(".")
            parent, _, leaf = module.rpartition(".")
            if leaf in FUSED_PROJECTIONS:
                fused, idx = FUSED_PROJECTIONS[leaf]
                shards.setdefault(f"{parent}.{fused}", {}).setdefault(idx, {})[suffix] = tensor.float()
            elif hasattr(modules.get(module), "load"):
                shards.setdefault(module, {}).setdefault(0, {})[suffix] = tensor.float()
            else:
                params[rel].data.copy_(tensor)
        for module, parts in shards.items():
            modules[module].load([parts[i] for i in sorted(parts)])  # type: ignore[operator]
        if experts:
            modules["mlp.experts"].load_named(experts)  # type: ignore[operator]
        captured: dict[str, list[torch.Tensor]] = {}
        keys = [g.captured for g in groups(cfg, sparse)] + (["mlp"] if sparse else [])
        hooks = [
            modules[key].register_forward_pre_hook(
                lambda _m, args, key=key: captured.setdefault(key, []).append(args[0].detach())
            )
            for key in keys
        ]
        # Offline there is no paged KV cache: swap the attention kernel for plain causal SDPA.
        setattr(layer.self_attn, "attn", _CausalAttention(layer.self_attn.attn))  # noqa: B010
        outs = []
        rope = self.rotary.tables(torch.arange(t), torch.float32)  # every sequence sits at positions 0..T-1
        with torch.no_grad():
            for seq in range(s):  # one sequence at a time: attention memory is O(T^2) for one sequence
                outs.append(layer(rope, h[seq], None, None))  # (T, H)
        for hook in hooks:
            hook.remove()
        return {k: torch.cat(v) for k, v in captured.items()}, torch.stack(outs)


class _CausalAttention(nn.Module):
    """Stands in for the paged Attention during calibration: plain causal SDPA over one sequence."""

    def __init__(self, inner: Any) -> None:  # qserve.layers.attention.Attention
        super().__init__()
        self.num_heads, self.num_kv_heads = int(inner.num_heads), int(inner.num_kv_heads)
        self.scale, self.window = float(inner.scale), inner.sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: object) -> torch.Tensor:
        t, group = q.shape[0], self.num_heads // self.num_kv_heads
        pos = torch.arange(t)
        mask = pos[None, :] <= pos[:, None]  # (T, T): key <= query
        if self.window is not None:
            mask &= pos[None, :] > pos[:, None] - int(self.window)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (T, Hq, D)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=self.scale
        )  # (Hq, T, D)
        return out.transpose(0, 1)  # (T, Hq, D)
