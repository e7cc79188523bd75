"""How many replicas a load needs: ``qserve plan ... --target-rps R --prompt-len L --output-len O``.

A replica spends ``O / decode_tps`` seconds of its decode throughput and ``L / prefill_tps`` seconds of
prefill on each request, so it serves ``1 / (O / decode_tps + L / prefill_tps)`` requests/s and the load
needs ``ceil(R / that)`` replicas (at least one). The throughputs come from

* a measurement, ``--replica-tps T``: the output tokens/s one replica sustained on this prompt/output mix
  (`qserve bench`'s ``output_tokens_per_second``); prefill is inside it, so ``decode_tps = T`` and
  there is no separate prefill term;
* or the roofline of a ``--gpu`` plan (an estimate, not a measurement): decode tokens/s is the plan's
  ``decode`` estimate (its batch of sequences at ``L + O`` tokens), and prefill is compute-bound at
  ``peak FLOP/s / (2 x dense weights + 2 x layers x q_size x L)`` tokens/s (each prompt token attends to
  L/2 earlier tokens on average; 2 FLOPs per multiply-add).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from qserve.errors import QServeError
from qserve.planner import MemoryPlan, dense_weights
from qserve.presets import find_gpu, load_model_source


@dataclass(frozen=True)
class ReplicaPlan:
    """The replicas a load needs. Field names are the ``replicas`` object of `qserve plan --json`."""

    target_rps: float
    prompt_len: int
    output_len: int
    source: str  # "measured" (--replica-tps) | "roofline" (a --gpu plan's estimate)
    decode_tokens_per_second: float  # one replica
    prefill_tokens_per_second: float | None  # one replica; None when measured (inside the measurement)
    replica_requests_per_second: float  # what one replica serves of this mix
    replicas: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def replicas_needed(
    target_rps: float, prompt_len: int, output_len: int, decode_tps: float, prefill_tps: float | None = None
) -> tuple[float, int]:
    """(requests/s one replica serves, replicas for ``target_rps``), by the formula in the module docstring."""
    seconds = output_len / decode_tps + (prompt_len / prefill_tps if prefill_tps else 0.0)
    per_replica = 1.0 / seconds
    return per_replica, max(1, math.ceil(round(target_rps / per_replica, 9)))


def prefill_tokens_per_second(plan: MemoryPlan, prompt_len: int) -> float:
    """Compute-bound prefill of ``prompt_len``-token prompts on the plan's GPU (module docstring)."""
    assert plan.gpu is not None
    src = load_model_source(plan.model)
    cfg = src.config
    flops_per_token = 2 * dense_weights(src) + 2 * cfg.num_layers * cfg.q_size * prompt_len
    return find_gpu(plan.gpu).flops / flops_per_token


def plan_replicas(
    plan: MemoryPlan,
    *,
    target_rps: float,
    prompt_len: int,
    output_len: int,
    replica_tps: float | None = None,
) -> ReplicaPlan:
    """The replicas ``plan`` (one replica's memory plan) needs for ``target_rps`` requests/s of
    ``prompt_len`` + ``output_len`` tokens; QServeError when there is nothing to estimate from."""
    if target_rps <= 0 or prompt_len < 1 or output_len < 1:
        raise QServeError("--target-rps must be positive and --prompt-len, --output-len at least 1")
    if replica_tps is not None:
        if replica_tps <= 0:
            raise QServeError(f"--replica-tps must be positive, got {replica_tps}")
        decode, prefill, source = replica_tps, None, "measured"
    elif plan.decode is not None:
        decode = plan.decode.tokens_per_second
        prefill, source = prefill_tokens_per_second(plan, prompt_len), "roofline"
    else:
        raise QServeError(
            "replicas need a throughput: --replica-tps T (output tokens/s one replica sustained, e.g. from "
            "qserve bench) or --gpu NAME (a roofline estimate); a plan that fits no sequence has none"
        )
    per_replica, n = replicas_needed(target_rps, prompt_len, output_len, decode, prefill)
    return ReplicaPlan(target_rps, prompt_len, output_len, source, decode, prefill, per_replica, n)


def replica_lines(r: ReplicaPlan) -> list[str]:
    """`qserve plan`'s text for a ReplicaPlan."""
    how = (
        f"measured {r.decode_tokens_per_second:,.0f} output tok/s per replica"
        if r.prefill_tokens_per_second is None
        else f"roofline estimate: decode {r.decode_tokens_per_second:,.0f} tok/s, "
        f"prefill {r.prefill_tokens_per_second:,.0f} tok/s per replica"
    )
    return [
        f"replicas needed: {r.replicas} for {r.target_rps:g} requests/s of {r.prompt_len} prompt + "
        f"{r.output_len} output tokens",
        f"  one replica serves {r.replica_requests_per_second:,.2f} requests/s ({how})",
    ]
