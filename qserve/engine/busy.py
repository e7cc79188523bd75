"""Device-busy time in fixed bins of monotonic time, so the ratio can be read at any later moment.

A snapshot of the engine's metrics may be read long after it was taken (the server scrapes the last one an
idle engine sent). A ratio frozen in the snapshot would go on reading busy on an idle server; the bins let
whoever reads it compute device time over wall time for the window ending *now*, which decays to 0 while
nothing runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

WINDOW_SECONDS = 10.0  # device_busy_ratio averages over this much recent wall time
BIN_SECONDS = 0.25  # resolution: the ratio is exact to within BIN_SECONDS / WINDOW_SECONDS


@dataclass
class BusyWindow:
    """Device seconds per bin (bin k covers monotonic [k * BIN_SECONDS, (k + 1) * BIN_SECONDS))."""

    bins: dict[int, float] = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)

    def add(self, start: float, end: float) -> None:
        """Count the device interval [start, end] (monotonic seconds), split over the bins it crosses."""
        k = math.floor(start / BIN_SECONDS)
        while start < end:
            edge = min(end, (k + 1) * BIN_SECONDS)
            self.bins[k] = self.bins.get(k, 0.0) + (edge - start)
            start, k = edge, k + 1
        oldest = math.floor((end - WINDOW_SECONDS) / BIN_SECONDS) - 1
        for old in [b for b in self.bins if b < oldest]:
            del self.bins[old]

    def export(self) -> dict[str, Any]:
        return {"bins": dict(self.bins), "created": self.created}


def busy_ratio(export: dict[str, Any], now: float | None = None) -> float:
    """Device time over wall time in (now - WINDOW_SECONDS, now], or since the engine started if later."""
    now = time.monotonic() if now is None else now
    start = max(now - WINDOW_SECONDS, export["created"])
    if now <= start:
        return 0.0
    busy = 0.0
    for k, seconds in export["bins"].items():
        lo, hi = k * BIN_SECONDS, (k + 1) * BIN_SECONDS
        overlap = max(0.0, min(hi, now) - max(lo, start))
        busy += seconds * overlap / BIN_SECONDS  # spread evenly inside its bin
    return min(1.0, busy / (now - start))
