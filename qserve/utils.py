"""Small helpers shared by the CLI, the planner and the server."""

from __future__ import annotations

import re
from types import ModuleType

from qserve.errors import QServeError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_size(text: str) -> int:
    """'64MiB' -> 67108864; '24GiB', '1.5GB', '4096' (bytes). Raises QServeError when malformed."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise QServeError(f"malformed size {text!r}: use e.g. 512MiB, 24GiB, 1.5GB or a byte count")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise QServeError(f"size must be positive, got {text!r}")
    return int(value)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def import_bitsandbytes() -> ModuleType:
    """``import bitsandbytes``, without its CPU backend's start-up warning.

    On AVX512-bf16 CPUs bitsandbytes (0.50) tries, at import, to fetch an optional 4-bit GEMM from the Hugging
    Face Hub through the ``kernels`` package; where that fails (an untrusted publisher, offline) it logs
    "Failed to load CPU gemm_4bit_forward ... pip install kernels" and runs its own built-in CPU kernel, the
    one qserve uses. That line would sit beside qserve's own output and errors as if something were wrong.
    """
    import logging

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        log.setLevel(level)
    return bitsandbytes
