"""bench/gpu.sh in its CPU plumbing mode (every section on CPU, tiny shapes), and bench/decode.py's goals.

The whole plumbing run takes several minutes on the 2-core CI machine (the interpreter runs the kernel
benches); GPU_SH_TEST_SECTIONS narrows it (e.g. "setup decode_bench") when iterating locally.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["setup", "gpu_tests", "kernels_bench", "attention_bench", "decode_bench"]


def _decode_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench" / "decode.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(
    w: str, kv: str, b: int, mode: str, tok_s: float, busy: float = 0.95, roof: float = 0.8
) -> dict[str, Any]:
    return dict(weights=w, kv=kv, batch=b, mode=mode, tok_s=tok_s, busy_profiler=busy, roofline=roof)


def test_decode_goals() -> None:
    dec = _decode_module()
    rows = [
        _row("bf16", "bf16", 1, "eager", 50.0, roof=0.3),
        _row("bf16", "bf16", 1, "graphs", 90.0, roof=0.75),
        _row("int4", "bf16", 1, "graphs", 180.0),
        _row("bf16", "bf16", 16, "graphs", 900.0, busy=0.93),
        _row("bf16", "bf16", 16, "eager", 500.0, busy=0.5),  # eager busy does not count once graphs ran
        _row("int4", "bf16", 64, "graphs", 3000.0, busy=0.91),
    ]
    got = {g["goal"]: (round(g["got"], 3), g["ok"]) for g in dec.goals(rows)}
    assert got == {
        "device busy (profiler) >= 90% at batch >= 16": (0.91, True),
        "graphs >= 1.5x eager tok/s at batch 1": (1.8, True),
        "int4 >= 1.9x bf16 decode at batch 1": (2.0, True),  # best mode of each
        ">= 70% of the HBM roofline at batch 1": (0.8, True),
    }
    eager_only = [_row("bf16", "bf16", 1, "eager", 50.0), dict(weights="bf16", kv="bf16", batch=1, mode="graphs",
                                                               unavailable="no CUDA device")]  # fmt: skip
    by_goal = {g["goal"]: g for g in dec.goals(eager_only)}
    assert (
        by_goal["graphs >= 1.5x eager tok/s at batch 1"]["ok"] is None
    )  # not measured: neither pass nor fail
    assert by_goal["int4 >= 1.9x bf16 decode at batch 1"]["got"] is None


@pytest.mark.slow
def test_gpu_sh_plumbing_on_cpu(tmp_path: Path) -> None:
    sections = os.environ.get("GPU_SH_TEST_SECTIONS", " ".join(SECTIONS)).split()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env |= dict(
        GPU_SH_ALLOW_CPU="1", PYTHON=sys.executable, OUT=str(tmp_path), GPU_SH_SECTIONS=" ".join(sections)
    )
    res = subprocess.run(
        ["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    log = (tmp_path / "gpu.log").read_text() if (tmp_path / "gpu.log").is_file() else res.stdout
    assert res.returncode == 0, log[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is True
    assert [s["name"] for s in summary["sections"]] == sections
    assert all(s["rc"] == 0 for s in summary["sections"]), summary["sections"]
    if "decode_bench" not in sections:
        return
    rows = summary["decode"]
    assert len(rows) == 9 * 3 * 2  # weights x KV x batch x eager/graphs
    eager = [r for r in rows if r["mode"] == "eager"]
    assert {(r["weights"], r["kv"], r["batch"]) for r in eager} == {
        (w, kv, b) for w in ("bf16", "int8", "int4") for kv in ("bf16", "int8", "int4") for b in (1, 16, 64)
    }
    for r in eager:
        assert r["tok_s"] > 0 and 0 < r["busy_profiler"] <= 1 and r["roofline"] > 0, r
        assert r["bytes_per_step"] > 0 and r["busy_events"] is None  # no CUDA events on CPU
    assert all(r.get("unavailable") == "no CUDA device" for r in rows if r["mode"] == "graphs")
    q = {r["weights"]: r["bytes_per_step"] for r in eager if r["kv"] == "bf16" and r["batch"] == 1}
    assert q["int4"] < q["int8"] < q["bf16"]  # the roofline counts the quantized weights' real bytes
    decode_goals = [g for g in summary["goals"] if g["source"] == "decode"]
    assert len(decode_goals) == 4
    assert summary["files"]["decode"] == "ok"
    if "kernels_bench" in sections:
        assert summary["files"]["kernels"] == "ok" and any(g["source"] == "kernels" for g in summary["goals"])
