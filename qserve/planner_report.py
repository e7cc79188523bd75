"""Presentation of a :class:`~qserve.planner_memory.MemoryPlan`: rich tables on stdout and a matplotlib plot."""

from __future__ import annotations

from qserve.errors import QServeError
from qserve.planner_memory import MemoryPlan, _gib, max_concurrent_sequences
from qserve.presets import cdiv


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def print_plan(p: MemoryPlan) -> None:
    """The byte budget and the weights x KV comparison as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    where = f"{p.gpu} ({_gib(p.memory_bytes)})" if p.gpu else f"a {_gib(p.memory_bytes)} budget"
    t = Table(title=f"qserve plan: {p.model} on {where}", title_justify="left")
    for col in ("", "bytes", "how"):
        t.add_column(col, justify="right" if col == "bytes" else "left")
    per_seq = cdiv(p.context, p.block_size) * p.block_size
    graph_how = "estimate, decode buckets" if p.cuda_graph_pool_bytes else "none (CPU or --enforce-eager)"
    rows = [
        ("memory", _gib(p.memory_bytes), p.gpu or "--memory"),
        ("runtime reserve", _gib(p.reserve_bytes), "CUDA ctx + 10% headroom" if p.gpu else "none"),
        (f"weights ({p.weights})", _gib(p.weights_bytes), "incl. scales, zeros"),
        *(
            [
                ("  routed experts (all)", _gib(p.expert_weights_bytes), "resident"),
                ("  experts read per token", _gib(p.active_expert_weights_bytes), "top-k of E per layer"),
            ]
            if p.expert_weights_bytes
            else []
        ),
        ("activation peak", _gib(p.activation_bytes), f"estimate, {p.max_num_batched_tokens} tok/step"),
        ("step buffers", _mib(p.step_buffer_bytes), "exact, persistent inputs"),
        ("CUDA graph pool", _mib(p.cuda_graph_pool_bytes), graph_how),
        ("KV cache pool", _gib(p.kv_cache_bytes), f"{p.kv_num_blocks:,} blocks"),
        (f"KV per token ({p.kv_cache_dtype})", f"{p.kv_bytes_per_token:,} B", f"{p.block_size} tokens/block"),
        ("KV capacity (tokens)", f"{p.kv_capacity_tokens:,}", "whole blocks"),
        (f"sequences of {p.context} tokens", str(p.max_concurrent_sequences), f"{per_seq} slots each"),
        ("max_num_seqs", str(p.max_num_seqs), "requested" if p.requested_max_num_seqs else "recommended"),
        ("max_num_batched_tokens", str(p.max_num_batched_tokens), "recommended"),
    ]
    if p.decode is not None:
        d = p.decode
        rows.append(("decode tokens/s", f"{d.tokens_per_second:,.0f}", f"roofline est., batch {d.batch}"))
        if d.cost_per_million_tokens is not None:
            rows.append(("USD / 1M output tokens", f"{d.cost_per_million_tokens:.3f}", "estimate"))
    for row in rows:
        t.add_row(*row)
    c = Table(title=f"weights x KV cache, sequences of {p.context} tokens", title_justify="left")
    for col in ("weights", "KV", "weights", "KV B/token", "KV tokens", "seqs", "tok/s est."):
        c.add_column(col, justify="left" if len(c.columns) < 2 else "right")
    for r in p.comparison:
        tps = f"{r.decode_tokens_per_second:,.0f}" if r.decode_tokens_per_second else "-"
        cap = f"{r.kv_capacity_tokens:,}" if r.kv_capacity_tokens else "no fit"
        kv = (r.kv_cache_dtype, _gib(r.weights_bytes), f"{r.kv_bytes_per_token:,}", cap)
        c.add_row(r.weights, *kv, str(r.max_concurrent_sequences), tps)
    console = Console()
    console.print(t)
    if p.max_concurrent_sequences == 0:
        console.print(f"note: {p.context} tokens exceed the KV capacity; serve would lower max_model_len")
    elif p.max_num_seqs > p.max_concurrent_sequences:
        console.print(
            f"note: only {p.max_concurrent_sequences} of {p.max_num_seqs} sequences fit at full length"
        )
    console.print(c)


def save_plot(p: MemoryPlan, path: str) -> None:
    """Concurrent sequences against context length, one line per weights x KV configuration."""
    try:
        import matplotlib
    except ImportError:
        raise QServeError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = [1 << e for e in range(8, 21) if 1 << e <= max(p.context, 1 << 17)]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = {"bf16": "tab:blue", "int8": "tab:orange", "int4": "tab:green"}
    styles = {"fp16": "-", "int8": "--", "int4": ":"}
    for r in p.comparison:
        ys = [max_concurrent_sequences(r.kv_capacity_tokens, x, p.block_size) for x in contexts]
        label = f"weights {r.weights} ({_gib(r.weights_bytes)}), KV {r.kv_cache_dtype}"
        label += "" if r.kv_capacity_tokens else ": does not fit"
        ax.plot(contexts, [y if y > 0 else float("nan") for y in ys], styles[r.kv_cache_dtype],
                color=colors[r.weights], marker="o", markersize=3, label=label)  # fmt: skip
    ax.axvline(p.context, color="grey", linewidth=0.8, label=f"planned context ({p.context} tokens)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [f"{x // 1024}K" if x >= 1024 else str(x) for x in contexts])
    ax.set_yscale("log")
    where = f"{p.gpu} ({_gib(p.memory_bytes)})" if p.gpu else f"a {_gib(p.memory_bytes)} budget"
    ax.set_title(f"{p.model} on {where}: how many sequences fit in the KV cache")
    ax.set_xlabel("context length per sequence (tokens)")
    ax.set_ylabel("max concurrent sequences")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise QServeError(f"cannot write plot {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
