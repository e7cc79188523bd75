"""Server logging: text or JSON lines (``--log-format``), and the periodic stats line.

JSON lines carry ``time`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``, plus the structured
fields a record was logged with (``extra={"fields": {...}}``): the access log's method, path, status,
tokens and latency, and the stats line's numbers, so a log shipper need not parse the message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from qserve.errors import QServeError

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
stats_logger = logging.getLogger("qserve.stats")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def check_log_format(fmt: str) -> str:
    if fmt not in LOG_FORMATS:
        raise QServeError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    return fmt


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    """One handler on the root logger (stderr) in ``fmt``; uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if check_log_format(fmt) == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


def stats_fields(prev: dict[str, Any], now: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The stats line's numbers from two engine-metrics snapshots ``seconds`` apart."""
    dt = max(seconds, 1e-9)
    return {
        "running": int(now["requests_running"]),
        "waiting": int(now["requests_waiting"]),
        "kv_cache_usage": round(float(now["kv_cache_usage_ratio"]), 4),
        "prompt_tokens_per_s": round((now["prompt_tokens_total"] - prev["prompt_tokens_total"]) / dt, 1),
        "generation_tokens_per_s": round(
            (now["generation_tokens_total"] - prev["generation_tokens_total"]) / dt, 1
        ),
        "prefix_cache_hit_rate": round(float(now.get("prefix_cache_hit_rate", 0.0)), 4),
    }


def busy(prev: dict[str, Any], now: dict[str, Any]) -> bool:
    """Anything running or waiting now, or tokens made since ``prev``."""
    return bool(
        now["requests_running"]
        or now["requests_waiting"]
        or now["prompt_tokens_total"] != prev["prompt_tokens_total"]
        or now["generation_tokens_total"] != prev["generation_tokens_total"]
    )


async def log_stats(snapshot: Callable[[], dict[str, Any]], interval: float) -> None:
    """Every ``interval`` seconds while busy, one line: running, waiting, KV usage, prompt and generation
    throughput over the interval, and the prefix cache's hit rate (since start). Silent while idle."""
    prev, t_prev = snapshot(), time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now, t_now = snapshot(), time.monotonic()
        if now and prev and busy(prev, now):
            f = stats_fields(prev, now, t_now - t_prev)
            stats_logger.info(
                "running: %d, waiting: %d, KV cache usage: %.1f%%, prompt: %.1f tok/s, "
                "generation: %.1f tok/s, prefix cache hit rate: %.1f%%",
                f["running"],
                f["waiting"],
                100 * f["kv_cache_usage"],
                f["prompt_tokens_per_s"],
                f["generation_tokens_per_s"],
                100 * f["prefix_cache_hit_rate"],
                extra={"fields": f},
            )
        prev, t_prev = now, t_now
