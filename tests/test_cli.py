"""The CLI end to end, as a user runs it (subprocess), including its one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def qserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qserve.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_commands() -> None:
    r = qserve("--help")
    assert r.returncode == 0
    for cmd in ("generate", "eval"):
        assert cmd in r.stdout


def test_generate_and_eval(tiny_llama: Path, tmp_path: Path) -> None:
    r = qserve("generate", str(tiny_llama), "hello", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello")
    data = tmp_path / "t.txt"
    data.write_text("def f(x):\n    return x * 2\n" * 20)
    r = qserve("eval", str(tiny_llama), "--data", str(data), "--json", "--context", "64")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res) == {"perplexity", "tokens", "tokens_per_second"}
    assert (
        res["tokens"] == 540 - 9
    )  # 540 byte tokens in 9 windows (8 x 64 + 28); the first of each is unscored
    assert res["perplexity"] > 1.0


def test_errors_are_one_line_exit_2(tiny_llama: Path, tmp_path: Path) -> None:
    cases = [
        ("generate", str(tmp_path / "missing"), "x"),
        ("eval", str(tiny_llama), "--data", str(tmp_path / "none.txt")),
        ("generate", str(tiny_llama), "x", "--kv-cache-dtype", "fp7"),
        ("generate", str(tiny_llama), "x", "--temperature", "-2"),
        ("generate", str(tiny_llama), "x", "--device", "tpu"),
    ]
    for args in cases:
        r = qserve(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
