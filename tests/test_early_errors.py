"""Errors a user meets first: every CLI value checked before anything loads (one `error:` line, exit 2),
usage errors in the same form, sizes in the Python API, and the small things around them (convert's
file modes, eval's progress, plan --plot's path, the tokenizer's long-text warning)."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from qserve import cli
from qserve.errors import QServeError


def qserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qserve.cli", *args], capture_output=True, text=True, timeout=120
    )


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.mark.parametrize(
    "args,match",
    [
        (("serve", "--prot", "8000"), "No such option: --prot"),
        (("generate", "demo", "hi", "--max-tokns", "3"), "No such option: --max-tokns"),
        (("serve", "--port", "eighty"), "Invalid value for '--port'"),
        (("generate",), "Missing argument"),
        (("serv",), "No such command 'serv'"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args: tuple[str, ...], match: str) -> None:
    r = qserve(*args)
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    assert match in line and "--help" in line, line
    assert "╭" not in r.stderr and "Usage:" not in r.stderr  # not click's boxed usage text


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Loading an engine (in-process or in the engine process) fails the test: errors must come first."""

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the engine was built before the flags were checked")

    monkeypatch.setattr("qserve.server.engine_process.EngineProcess.start", boom)
    monkeypatch.setattr("qserve.engine.llm_engine.LLMEngine.__init__", boom)
    yield


def run_cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli.app, list(args))
    assert not isinstance(res.exception, AssertionError), res.exception
    return res.exit_code, res.stderr


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--memory-budget", "2.0"], "at most 1"),
        (["--memory-budget", "0"], "more than 0 and at most 1"),
        (["--max-model-len", "99999"], "more than the model's 512 positions"),
        (["--kv-cache-dtype", "int3"], "kv_cache_dtype 'int3'"),
        (["--dtype", "float8"], "unsupported dtype 'float8'"),
        (["--device", "tpu"], "device 'tpu'"),
        (["--log-format", "xml"], "--log-format must be one of text, json"),
        (["--stats-interval", "-1"], "--stats-interval"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout"),
        (["--threads", "0"], "--threads"),
        (["--kv-cache-memory", "lots"], "malformed size 'lots'"),
    ],
)
def test_serve_values_checked_before_loading(
    tiny_llama: Path, no_loading: None, flags: list[str], match: str
) -> None:
    code, err = run_cli("serve", str(tiny_llama), "--port", "1", *flags)
    assert code == 2, err
    assert match in one_error_line(err)


@pytest.mark.parametrize(
    "command,flags,match",
    [
        ("generate", ["--kv-cache-dtype", "int3"], "kv_cache_dtype 'int3'"),
        ("generate", ["--dtype", "fp8"], "unsupported dtype"),
        ("eval", ["--kv-cache-dtype", "int3"], "kv_cache_dtype 'int3'"),
        ("eval", ["--context", "1"], "--context must be at least 2"),
    ],
)
def test_generate_eval_values_checked_before_loading(
    tiny_llama: Path, tmp_path: Path, no_loading: None, command: str, flags: list[str], match: str
) -> None:
    data = tmp_path / "t.txt"
    data.write_text("some text " * 20)
    args = ["hi"] if command == "generate" else ["--data", str(data)]
    code, err = run_cli(command, str(tiny_llama), *args, *flags)
    assert code == 2, err
    assert match in one_error_line(err)


def test_python_api_takes_sizes_and_checks_values(tiny_llama: Path) -> None:
    from qserve import LLM

    by_string = LLM(str(tiny_llama), device="cpu", kv_cache_memory="256KiB")
    by_int = LLM(str(tiny_llama), device="cpu", kv_cache_memory=256 << 10)
    assert by_string.engine.config.kv_cache_memory == 256 << 10
    assert by_string.engine.kv.capacity_tokens == by_int.engine.kv.capacity_tokens > 0
    with pytest.raises(QServeError, match="more than the model's 512 positions"):
        LLM(str(tiny_llama), device="cpu", max_model_len=99999)
    for kwargs, match in [
        ({"kv_cache_dtype": "int3"}, "kv_cache_dtype"),
        ({"kv_cache_memory": "lots"}, "malformed size"),
        ({"kv_cache_memory": -5}, "kv_cache_memory must be"),
        ({"max_num_seqs": 0}, "max_num_seqs must be a positive integer"),
        ({"device": "tpu"}, "device 'tpu'"),
    ]:
        with pytest.raises(QServeError, match=match):
            LLM(str(tiny_llama), **kwargs)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_convert_output_respects_umask(tiny_llama: Path, tmp_path: Path, umask: int) -> None:
    out = tmp_path / "int8"
    old = os.umask(umask)
    try:
        code, err = run_cli("convert", str(tiny_llama), str(out), "--weights", "int8", "--no-progress")
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = [f for f in out.iterdir() if f.is_file()]
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask for f in files)


def test_eval_shows_progress(tiny_llama: Path, tmp_path: Path) -> None:
    data = tmp_path / "t.txt"
    data.write_text("def f(x):\n    return x * 2\n" * 100)  # 2700 byte tokens: 43 windows of 64
    res = CliRunner().invoke(cli.app, ["eval", str(tiny_llama), "--data", str(data), "--context", "64"])
    assert res.exit_code == 0, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.startswith("eval: scored")]
    assert lines[0] == "eval: scored 0/2700 tokens" and lines[-1] == "eval: scored 2700/2700 tokens"
    assert len(lines) == 3  # 0, after 32 windows, after all 43
    assert res.stdout.startswith("perplexity ")


def test_plot_prints_its_path(tmp_path: Path) -> None:
    png = tmp_path / "plan.png"
    res = CliRunner().invoke(cli.app, ["plan", "demo", "--memory", "1GiB", "--plot", str(png)])
    assert res.exit_code == 0, res.stderr
    assert f"wrote {png}" in res.stdout and png.stat().st_size > 0


def test_weight_format_names() -> None:
    from qserve.server.plan_info import weight_format

    assert weight_format(None, "bfloat16") == "bfloat16"
    q = {"quant_method": "qserve", "weights": "int4", "group_size": 128, "method": "awq"}
    assert weight_format(q, "float16") == "int4 g128 (awq)"
    assert weight_format({"quant_method": "qserve", "weights": "int8", "method": "rtn"}, "x") == "int8 (rtn)"
    assert weight_format({"quant_method": "gptq", "bits": 4, "group_size": 64}, "x") == "int4 g64 (gptq)"


def test_no_long_sequence_warning(tiny_llama: Path, caplog: pytest.LogCaptureFixture, capfd: Any) -> None:
    from qserve.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_llama)
    with caplog.at_level(logging.WARNING):
        ids = tok.encode("x" * 5000)
    assert len(ids) >= 5000
    seen = caplog.text + capfd.readouterr().err
    assert "Token indices sequence length" not in seen
