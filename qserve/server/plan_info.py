"""The start-up plan `qserve serve` prints: what the engine actually allocated, in the planner's terms."""

from __future__ import annotations

from typing import Any

import torch

from qserve.utils import format_size


def weight_bytes(model: Any) -> int:
    """Bytes of the loaded weights: every tensor a module holds (parameters, buffers, and the plain tensor
    attributes of quantized and oneDNN-prepacked linears, whose packed weights are not in the state dict),
    shared tensors counted once."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        buffers = [b for name, b in m._buffers.items() if name not in m._non_persistent_buffers_set]
        tensors = [*m._parameters.values(), *buffers, *vars(m).values()]  # not RoPE tables and the like
        for t in tensors:
            if not isinstance(t, torch.Tensor) or not t.numel():
                continue
            if t.layout == torch._mkldnn:  # type: ignore[attr-defined]  # opaque: no data_ptr, never shared
                total += t.numel() * t.element_size()
            elif t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def weight_format(quantization: dict[str, Any] | None, dtype: str) -> str:
    """The stored weight format: 'int4 g128 (awq)', 'int8 (rtn)', or the float dtype when unquantized."""
    if not quantization:
        return dtype
    q = quantization
    name = str(q.get("weights") or (f"int{q['bits']}" if "bits" in q else q.get("quant_method", "quantized")))
    if q.get("group_size") and name == "int4":
        name += f" g{q['group_size']}"
    method = q.get("method") or (q.get("quant_method") if q.get("quant_method") != "qserve" else None)
    return f"{name} ({method})" if method else name


def plan_lines(
    engine: Any, max_queue: int, threads: int | None = None, prefill_threads: int | None = None
) -> list[str]:
    spec, kv = engine.kv_spec, engine.kv
    cfg = engine.model_config
    device = str(engine.device)
    if threads is not None:
        device += f", {threads} thread{'s' if threads > 1 else ''}"
        if prefill_threads is not None and prefill_threads != threads:
            from qserve.server.engine_core import LOW_TRAFFIC_THREADS_MAX_TOKENS as low

            device += f" ({prefill_threads} for big prefills and steps of at most {low} tokens)"
    return [
        f"model         {engine.config.model} ({cfg.architecture}, {engine.dtype_name}) on {device}",
        f"weights       {weight_format(cfg.quantization, engine.dtype_name)}, "
        f"{format_size(weight_bytes(engine.model))}",
        f"kv cache      {spec.dtype}, {spec.bytes_per_token} B/token, "
        f"{format_size(kv.capacity_tokens * spec.bytes_per_token)} = {kv.capacity_tokens} tokens",
        f"capacity      {kv.capacity_tokens // engine.max_model_len} sequences at max_model_len {engine.max_model_len}",
        f"max_num_seqs  {engine.scheduler.max_num_seqs}, max_queue {max_queue}",
        f"step          buffers {format_size(engine.runner.buffers.nbytes)}, {graph_line(engine)}",
    ]


def graph_line(engine: Any) -> str:
    """The CUDA graphs the engine captured, with their pool measured and as planned; or why there are none."""
    graphs = engine.runner.graphs
    if graphs is None:
        why = "CPU" if engine.device.type != "cuda" else "--enforce-eager or a failed capture"
        return f"no CUDA graphs ({why})"
    return (
        f"{len(graphs.graphs)} CUDA graphs (decode buckets up to {graphs.sizes[-1]}), pool "
        f"{format_size(graphs.memory_bytes)} measured, {format_size(engine.graph_pool_planned)} planned"
    )
