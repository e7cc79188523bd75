"""`qserve bench`: a load generator for any OpenAI-compatible server (qserve, vLLM, ...).

A client only: it talks HTTP and never imports the engine or the server.

    from qserve.bench import BenchConfig, run_bench
    report = run_bench(BenchConfig("http://127.0.0.1:8000", workload="closed", concurrency=8, requests=32))
    report.to_json()["throughput"]["output_tokens_per_second"]

Names are imported on first use, so `qserve --help` does not pay for the HTTP client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qserve.bench.config import BenchConfig, LengthDist
    from qserve.bench.report import BenchReport
    from qserve.bench.runner import run_bench, run_bench_async

_HOMES = {
    "BenchConfig": "config",
    "LengthDist": "config",
    "BenchReport": "report",
    "run_bench": "runner",
    "run_bench_async": "runner",
}
__all__ = ["BenchConfig", "BenchReport", "LengthDist", "run_bench", "run_bench_async"]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"qserve.bench.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'qserve.bench' has no attribute {name!r}")
