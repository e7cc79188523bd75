"""`qserve serve` flags: sizing from --memory-budget / --kv-cache-memory, and one-line errors with exit 2."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qserve.errors import QServeError
from qserve.server.launch import ServeOptions, device_memory, kv_budget


def test_kv_budget(plain_model: Path) -> None:
    from qserve.planner import plan_engine

    assert kv_budget(ServeOptions(model=str(plain_model))) == (None, None)
    assert kv_budget(ServeOptions(model=str(plain_model), kv_cache_memory="64MiB")) == (64 << 20, None)
    # --memory-budget goes through the planner: the same KV bytes and max_num_seqs `qserve plan` reports
    plan = plan_engine(str(plain_model), 8 << 20)
    assert kv_budget(ServeOptions(model=str(plain_model), memory_budget="8MiB")) == (
        plan.kv_cache_bytes,
        plan.max_num_seqs,
    )
    assert 0 < plan.kv_cache_bytes < (8 << 20) - plan.weights_bytes
    fixed = kv_budget(ServeOptions(model=str(plain_model), memory_budget="8MiB", max_num_seqs="3"))
    assert fixed[1] is None
    frac = kv_budget(ServeOptions(model=str(plain_model), memory_budget="0.01", device="cpu"))
    assert frac[0] == plan_engine(str(plain_model), int(device_memory("cpu") * 0.01)).kv_cache_bytes
    # --dtype bfloat16 halves a float32 checkpoint's weights, leaving more for the KV pool
    bf16 = plan_engine(str(plain_model), 8 << 20, dtype="bfloat16")
    assert bf16.weights_bytes == plan.weights_bytes // 2
    with pytest.raises(QServeError, match="smaller than the weights"):
        kv_budget(ServeOptions(model=str(plain_model), memory_budget="1KiB"))
    with pytest.raises(QServeError, match="not both"):
        kv_budget(ServeOptions(model=str(plain_model), memory_budget="1GiB", kv_cache_memory="1GiB"))


def test_serve_errors_are_one_line_exit_2(plain_model: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [
            (str(tmp_path / "missing"),),
            (str(plain_model), "--port", "0"),
            (str(plain_model), "--memory-budget", "1KiB"),
            (str(plain_model), "--max-num-seqs", "lots"),
            (str(plain_model), "--kv-cache-memory", "12 parsecs"),
            (str(plain_model), "--max-queue", "0"),
            (str(plain_model), "--port", port),
        ]
        for args in cases:
            r = subprocess.run(
                [sys.executable, "-m", "qserve.cli", "serve", *args],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 2, (args, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)


def test_step_loop_flags_reach_the_engine_config(plain_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qserve.server.launch import engine_config

    monkeypatch.delenv("QSERVE_ENFORCE_EAGER", raising=False)
    monkeypatch.delenv("QSERVE_ASYNC_SCHEDULING", raising=False)
    plain = engine_config(ServeOptions(model=str(plain_model)))
    assert (plain.enforce_eager, plain.async_scheduling) == (False, False)
    both = engine_config(ServeOptions(model=str(plain_model), enforce_eager=True, async_scheduling=True))
    assert (both.enforce_eager, both.async_scheduling) == (True, True)
    monkeypatch.setenv("QSERVE_ASYNC_SCHEDULING", "1")
    assert engine_config(ServeOptions(model=str(plain_model))).async_scheduling
