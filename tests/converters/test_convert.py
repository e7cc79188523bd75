"""Round-to-nearest conversion end to end: format round trip, sharding, report, runtime load."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qserve.converters import QuantizedWeight, convert, quantize_weight
from qserve.converters.report import REPORT_NAME
from qserve.errors import QServeError

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118
    return out


def test_quantize_weight_public_api() -> None:
    w = torch.randn(32, 256, dtype=torch.bfloat16)
    qw = quantize_weight(w)  # int4, group 128 by default
    assert isinstance(qw, QuantizedWeight) and qw.group_size == 128 and qw.weights == "int4"
    assert qw.dequantize().shape == w.shape and qw.dequantize().dtype == torch.bfloat16
    assert float((qw.dequantize().float() - w.float()).norm() / w.float().norm()) < 0.15
    q8 = quantize_weight(w, weights="int8")
    assert float((q8.dequantize().float() - w.float()).norm() / w.float().norm()) < 0.01
    with pytest.raises(QServeError, match="does not divide"):
        quantize_weight(torch.randn(8, 96), group_size=64)
    with pytest.raises(QServeError, match="group-size"):
        quantize_weight(torch.randn(8, 96), group_size=48)


@pytest.mark.parametrize(("weights", "group"), [("int4", 32), ("int4", 64), ("int8", None)])
def test_format_round_trip(
    tiny_model_factory: Callable[..., Path], tmp_path: Path, weights: str, group: int | None
) -> None:
    src = tiny_model_factory("qwen2")  # q/k/v biases, tied embeddings
    out = convert(src, tmp_path / "q", weights=weights, group_size=group, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["format_version"], q["weights"], q["method"]) == (
        "qserve",
        1,
        weights,
        "rtn",
    )
    assert q["group_size"] == (group if weights == "int4" else -1)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    before, after = _tensors(src), _tensors(out)
    for name, w in before.items():
        module, _, suffix = name.rpartition(".")
        if module.rpartition(".")[2] in LINEARS and suffix == "weight":
            qw = QuantizedWeight.from_tensors(
                {
                    s: after[f"{module}.{s}"]
                    for s in ("qweight", "scales", "qzeros")
                    if f"{module}.{s}" in after
                },
                weights,
                group or -1,
            )
            assert torch.equal(qw.dequantize(), quantize_weight(w, weights, group or 128).dequantize())
            assert name not in after
        else:
            assert torch.equal(after[name], w), name  # embeddings, norms, biases pass through unchanged
    report = json.loads((out / REPORT_NAME).read_text())
    assert len(report["layers"]) == 2 * 7
    assert report["summary"]["max_rel_error"] < (0.15 if weights == "int4" else 0.01)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir renamed away


def test_sharded_input_and_output(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model_factory("llama", shards=3)
    assert (src / "model.safetensors.index.json").is_file()
    out = convert(src, tmp_path / "q", group_size=32, progress=False, max_shard_bytes=64 << 10)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert set(index["weight_map"]) == set(_tensors(out))


def test_size_bars(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model_factory("llama", dtype=torch.bfloat16, hidden_size=128, intermediate_size=256)
    r4 = json.loads((convert(src, tmp_path / "a", progress=False) / REPORT_NAME).read_text())["summary"]
    r8 = json.loads((convert(src, tmp_path / "b", weights="int8", progress=False) / REPORT_NAME).read_text())[
        "summary"
    ]
    assert r4["size_vs_bf16"] <= 0.30 and r8["size_vs_bf16"] <= 0.52


def test_converted_model_runs_close_to_float(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    from qserve.engine.llm import LLM
    from qserve.eval import perplexity

    src = tiny_model_factory("llama")
    text = "def add(a, b):\n    return a + b\n" * 12
    base = perplexity(LLM(str(src), device="cpu"), text, context=128).nll
    for weights, tol in (("int8", 0.01), ("int4", 0.1)):
        out = convert(src, tmp_path / weights, weights=weights, group_size=32, progress=False)
        nll = perplexity(LLM(str(out), device="cpu"), text, context=128).nll
        assert abs(nll - base) < tol * base, (weights, nll, base)


def test_force_replaces_existing_out(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model_factory("llama")
    out = tmp_path / "q"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(QServeError, match="already exists"):
        convert(src, out, group_size=32, progress=False)
    assert (out / "stale.txt").is_file()
    convert(src, out, weights="int8", force=True, progress=False)
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
