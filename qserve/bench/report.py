"""A run's results: `BenchReport` (JSON, a rich table) and the matplotlib plot.

JSON keys (stable; other tools read them): ``config``, ``duration_s``, ``requests`` {total, completed,
failed}, ``errors`` {type: count}, ``throughput`` {requests_per_second, output_tokens_per_second,
total_tokens_per_second}, ``latency`` {ttft_s, itl_s, e2e_s: {mean, p50, p90, p99}}, ``utilization`` (null
unless the server is qserve), ``per_request``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from qserve.bench import stats
from qserve.bench.client import RequestResult
from qserve.errors import QServeError


@dataclass
class BenchReport:
    """Everything a run measured: the config it ran with, each request's timings, the /metrics samples."""

    config: dict[str, Any]
    results: list[RequestResult]
    samples: list[dict[str, float]]
    is_qserve: bool

    @property
    def duration_s(self) -> float:
        return stats.window(self.results)

    @property
    def completed(self) -> int:
        return sum(r.ok for r in self.results)

    def utilization(self) -> dict[str, Any] | None:
        util = stats.utilization(self.samples) if self.is_qserve else None
        if util is not None:
            caps = [s["kv_cache_capacity_tokens"] for s in self.samples if "kv_cache_capacity_tokens" in s]
            util["kv_cache_capacity_tokens"] = int(caps[-1]) if caps else None
        return util

    def to_json(self, per_request: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config": self.config,
            "duration_s": self.duration_s,
            "requests": {
                "total": len(self.results),
                "completed": self.completed,
                "failed": len(self.results) - self.completed,
            },
            "errors": stats.errors(self.results),
            "throughput": stats.throughput(self.results, self.duration_s),
            "latency": stats.latency(self.results),
            "utilization": self.utilization(),
        }
        if per_request:
            out["per_request"] = [request_json(r) for r in self.results]
        return out

    def write_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def request_json(r: RequestResult) -> dict[str, Any]:
    return {
        "index": r.index,
        "session": r.session,
        "turn": r.turn,
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens,
        "output_len": r.output_len,
        "send_s": r.send_time,
        "ttft_s": stats.ttft(r),
        "e2e_s": stats.e2e(r),
        "error": r.error,
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.1f}"


def print_report(report: BenchReport, console: Console) -> None:
    """The summary as rich tables: throughput, latency percentiles, utilization and errors."""
    data = report.to_json(per_request=False)
    cfg, req, tp = data["config"], data["requests"], data["throughput"]
    console.print(
        f"[bold]{cfg['workload']}[/bold] against {cfg['url']} (model {cfg['model']}): "
        f"{req['completed']}/{req['total']} requests completed in {data['duration_s']:.2f} s, "
        f"concurrency {cfg['concurrency']}"
    )
    console.print(
        f"throughput: {tp['requests_per_second']:.2f} req/s, {tp['output_tokens_per_second']:.1f} output "
        f"tok/s, {tp['total_tokens_per_second']:.1f} total tok/s"
    )
    table = Table("latency (ms)", "mean", "p50", "p90", "p99")
    for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("E2E", "e2e_s")):
        s = data["latency"][key]
        table.add_row(name, *(_ms(s[k]) for k in ("mean", "p50", "p90", "p99")))
    console.print(table)
    util = data["utilization"]
    if util is not None:
        ut = Table("utilization", "mean", "max")
        for name in stats.UTILIZATION_GAUGES:
            s = util[name]
            ut.add_row(name, *("-" if s[k] is None else f"{s[k]:.2f}" for k in ("mean", "max")))
        ut.add_row("preemptions", str(util["preemptions"]), "")
        console.print(ut)
    else:
        console.print("utilization: not sampled (the server's /metrics is not qserve's)")
    if data["errors"]:
        examples = {r.error: r.error_message for r in report.results if r.error is not None}
        for kind, count in data["errors"].items():
            console.print(f"errors {kind}: {count} (e.g. {examples.get(kind)})", style="red", markup=False)


def plot_reports(reports: list[tuple[str, BenchReport]], path: Path) -> None:
    """Latency against throughput (one point per time window of each run, and each run's overall p50/p99
    E2E), and utilization over time (qserve runs), side by side in one PNG."""
    try:
        import matplotlib
    except ImportError:
        raise QServeError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    right_twin = right.twinx()
    for i, (label, rep) in enumerate(reports):
        color = f"C{i}"
        points = stats.timeline(rep.results, max(rep.duration_s / 20, 0.5))
        if points:
            left.scatter([p[1] for p in points], [p[2] for p in points], s=12, alpha=0.5, color=color)
        data = rep.to_json(per_request=False)
        tok_s, e2e = data["throughput"]["output_tokens_per_second"], data["latency"]["e2e_s"]
        if e2e["p50"] is not None:
            left.errorbar(
                [tok_s], [e2e["p50"]], yerr=[[0], [e2e["p99"] - e2e["p50"]]], fmt="o", ms=8, color=color,
                capsize=4, label=f"{label}: p50 (bar to p99)",
            )  # fmt: skip
        for s_name, style, ax in (
            ("device_busy_ratio", "-", right),
            ("kv_cache_usage_ratio", "--", right),
            ("batch_size", ":", right_twin),
        ):
            xs = [(s["t"], s[s_name]) for s in rep.samples if s_name in s]
            if xs:
                ax.plot(*zip(*xs, strict=True), style, color=color, label=label if style == "-" else None)
    left.set(xlabel="output tokens/s", ylabel="end-to-end latency (s)", title="Latency against throughput")
    left.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    right.set(
        xlabel="time (s)",
        ylabel="device_busy_ratio (solid), kv_cache_usage_ratio (dashed)",
        ylim=(0, 1.05),
        title="Utilization (qserve /metrics)",
    )
    right_twin.set_ylabel("batch_size (dotted)")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8, loc="lower right")
    else:
        right.text(0.5, 0.5, "not sampled: not a qserve server", ha="center", transform=right.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
