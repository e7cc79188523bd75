"""AutoAWQ (GEMM) and GPTQ checkpoints re-packed into qserve's format with bit-exact dequantized weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qserve.converters import QuantizedWeight, convert
from qserve.errors import QServeError
from tests.converters.fixtures import write_quantized_checkpoint


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118


@pytest.mark.parametrize(
    ("kind", "sym", "v2"),
    [("awq", False, False), ("gptq", True, False), ("gptq", False, False), ("gptq", False, True)],
)
def test_import_is_bit_exact(
    tiny_model_factory: Callable[..., Path], tmp_path: Path, kind: str, sym: bool, v2: bool
) -> None:
    src = tiny_model_factory("qwen2")  # q/k/v biases ride along unquantized
    ckpt = tmp_path / kind
    expected = write_quantized_checkpoint(src, ckpt, kind, group_size=32, sym=sym, v2=v2)
    out = convert(ckpt, tmp_path / "out", progress=False)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (q["quant_method"], q["weights"], q["group_size"], q["method"]) == ("qserve", "int4", 32, kind)
    assert q["imported_from"]["quant_method"] == kind
    got, source = _tensors(out), _tensors(ckpt)
    for module, w in expected.items():
        qw = QuantizedWeight.from_tensors(
            {s: got[f"{module}.{s}"] for s in ("qweight", "qzeros", "scales")}, "int4", 32
        )
        assert torch.equal(qw.dequantize(torch.float16), w), module
        assert f"{module}.g_idx" not in got
    for name, t in source.items():
        if name.rpartition(".")[2] not in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(got[name], t), name


def test_imported_and_direct_checkpoints_run_identically(
    tiny_model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    from qserve.engine.llm import LLM
    from qserve.eval import perplexity

    src = tiny_model_factory("llama")
    text = "for i in range(10):\n    print(i)\n" * 8
    for kind in ("awq", "gptq"):
        ckpt = tmp_path / kind
        write_quantized_checkpoint(src, ckpt, kind, group_size=32)
        out = convert(ckpt, tmp_path / f"{kind}-qserve", progress=False)
        direct = perplexity(LLM(str(ckpt), device="cpu", dtype="float32"), text, context=128).nll
        imported = perplexity(LLM(str(out), device="cpu", dtype="float32"), text, context=128).nll
        assert direct == pytest.approx(imported, rel=1e-6)


def test_import_refuses_settings(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "awq"
    write_quantized_checkpoint(tiny_model_factory("llama"), ckpt, "awq", group_size=32)
    for kw in ({"weights": "int8"}, {"group_size": 64}, {"method": "awq"}):
        with pytest.raises(QServeError, match="re-packed as is"):
            convert(ckpt, tmp_path / "out", progress=False, **kw)  # type: ignore[arg-type]
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["desc_act"] = True
    cfg["quantization_config"]["quant_method"] = "gptq"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QServeError, match="desc_act"):
        convert(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_legacy_quantize_config_json(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "gptq"
    expected = write_quantized_checkpoint(tiny_model_factory("llama"), ckpt, "gptq", group_size=32, sym=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    legacy = cfg.pop("quantization_config")
    legacy.pop("quant_method")  # old AutoGPTQ files do not name the method
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "quantize_config.json").write_text(json.dumps(legacy))
    out = convert(ckpt, tmp_path / "out", progress=False)
    assert not (out / "quantize_config.json").exists()
    got = _tensors(out)
    module = next(iter(expected))
    qw = QuantizedWeight.from_tensors(
        {s: got[f"{module}.{s}"] for s in ("qweight", "qzeros", "scales")}, "int4", 32
    )
    assert torch.equal(qw.dequantize(torch.float16), expected[module])
