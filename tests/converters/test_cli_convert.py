"""`qserve convert` errors: exit code 2, one clear line on stderr, nothing at OUT (and no temp dir left)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qserve.cli_convert import convert_command


def _invoke(*args: str) -> tuple[int, str, str]:
    from qserve import cli

    registered = any(c.name == "convert" for c in cli.app.registered_commands)
    if registered:
        app, argv = cli.app, ["convert", *args]
    else:  # until qserve/cli.py registers the command
        app, argv = typer.Typer(), list(args)
        app.command()(convert_command)
    res = CliRunner().invoke(app, argv)
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture
def src(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_factory("llama"), tmp_path / "src"))


def _check_failure(args: list[str], out: Path, match: str) -> None:
    code, _, err = _invoke(*args, "--no-progress")
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert not out.exists() or out.is_file() and out.name == "afile"
    leftovers = (
        [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
        if out.parent.is_dir()
        else []
    )
    assert not leftovers


def _corrupt(src: Path) -> None:
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")


def _truncate(src: Path) -> None:
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _missing_shard(src: Path) -> None:
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))


def _no_weights(src: Path) -> None:
    (src / "model.safetensors").unlink()


def _bad_arch(src: Path) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))


def _bad_dtype(src: Path) -> None:
    t = load_file(str(src / "model.safetensors"))
    t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"].to(torch.float64)
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})


def _bad_config(src: Path) -> None:
    (src / "config.json").write_text("{not json")


def _bnb_config(src: Path) -> None:  # what transformers writes for BitsAndBytesConfig(load_in_4bit=True)
    cfg = json.loads((src / "config.json").read_text())
    q = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (src / "config.json").write_text(json.dumps({**cfg, "quantization_config": q}))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (_corrupt, "corrupt or truncated"),
        (_truncate, "corrupt or truncated"),
        (_missing_shard, "missing safetensors shard"),
        (_no_weights, "no safetensors weights"),
        (_bad_arch, "unsupported architecture GPT2LMHeadModel"),
        (_bad_dtype, "unsupported dtype F64"),
        (_bad_config, "not valid JSON"),
        (_bnb_config, "SRC is a bitsandbytes nf4 checkpoint: qserve serves it as it is"),
    ],
)
def test_bad_source(src: Path, tmp_path: Path, mutate: Callable[[Path], None], match: str) -> None:
    mutate(src)
    out = tmp_path / "out"
    _check_failure([str(src), str(out), "--group-size", "32"], out, match)


def test_missing_source(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _check_failure([str(tmp_path / "nope"), str(out)], out, "model directory not found")


def test_group_size_must_divide(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"  # hidden_size 64: the default group size 128 cannot divide it
    _check_failure([str(src), str(out)], out, "group size 128 does not divide in_features 64")


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--weights", "int3"], "unknown --weights"),
        (["--group-size", "48"], "unsupported --group-size 48"),
        (["--method", "gptq"], "unknown --method"),
        (
            ["--method", "awq", "--group-size", "32", "--calib", "/nonexistent/calib.txt"],
            "calibration file not found",
        ),
    ],
)
def test_bad_flags(src: Path, tmp_path: Path, flags: list[str], match: str) -> None:
    out = tmp_path / "out"
    _check_failure([str(src), str(out), *flags], out, match)


def test_out_not_writable(src: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("a file where a directory should be")
    out = blocker / "out"
    code, _, err = _invoke(str(src), str(out), "--group-size", "32", "--no-progress")
    assert code == 2 and err.startswith("error: OUT is not writable") and len(err.strip().splitlines()) == 1
    assert blocker.read_text().startswith("a file")


def test_existing_out_needs_force(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = _invoke(str(src), str(out), "--group-size", "32", "--no-progress")
    assert code == 2 and "already exists (use --force" in err
    assert list(out.iterdir()) == []
    code, stdout, err = _invoke(str(src), str(out), "--group-size", "32", "--force", "--no-progress")
    assert code == 0, err
    assert "int4 g32" in stdout and (out / "config.json").is_file()
