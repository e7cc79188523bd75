"""--method awq: activation-aware scales beat round-to-nearest, and folding them keeps the float model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qserve.converters.awq as awq
import qserve.converters.awq_search as awq_search
from qserve.converters import convert
from qserve.converters.plan import Target
from qserve.converters.report import REPORT_NAME

CALIB = (Path(__file__).parents[2] / "qserve" / "config.py").read_text()
HELDOUT = (Path(__file__).parents[2] / "kernels" / "packing.py").read_text()[:3000]


@pytest.fixture
def small_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(awq, "MAX_TOKENS", 1024)
    monkeypatch.setattr(awq, "SEQ_LEN", 256)
    monkeypatch.setattr(awq_search, "SCALE_GRID", 10)
    monkeypatch.setattr(awq_search, "CLIP_GRID", 10)


@pytest.fixture
def outlier_model(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> Path:
    """A tiny Llama whose RMSNorm gains have a few large channels: the activation outliers AWQ targets."""
    src = Path(
        shutil.copytree(tiny_model_factory("llama", hidden_size=128, intermediate_size=256), tmp_path / "src")
    )
    t = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for name in t:
        if name.endswith("layernorm.weight"):
            t[name][torch.randperm(t[name].numel(), generator=g)[:4]] *= 20
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def test_searches_never_lose_to_rtn() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 128) * torch.where(torch.rand(128) < 0.05, 30.0, 1.0)  # (M, K) outlier channels
    w = torch.randn(64, 128) * 0.05
    target = Target("int4", 32)
    rtn = awq_search.output_error(x, w, awq_search.fake_quant(w, target, torch.float32))
    s, alpha = awq_search.search_scale(x, w, target, torch.float32)
    scaled = awq_search.output_error(x, w, awq_search.fake_quant(w * s, target, torch.float32) / s)
    assert s.shape == (128,) and 0 <= alpha < 1 and scaled < 0.8 * rtn
    clipped = awq_search.search_clip(x / s, w * s, target, torch.float32)
    assert bool((clipped.abs() <= (w * s).abs()).all())
    both = awq_search.output_error(x, w, awq_search.fake_quant(clipped, target, torch.float32) / s)
    assert both <= scaled
    x1 = torch.ones(8, 128)  # s = 1 is always a candidate: the search never ends worse than RTN
    s1, _ = awq_search.search_scale(x1, w, target, torch.float32)
    rtn1 = awq_search.output_error(x1, w, awq_search.fake_quant(w, target, torch.float32))
    assert awq_search.output_error(x1, w, awq_search.fake_quant(w * s1, target, torch.float32) / s1) <= rtn1


@pytest.mark.usefixtures("small_calibration")
def test_awq_beats_rtn_on_perplexity(outlier_model: Path, tmp_path: Path) -> None:
    from qserve.engine.llm import LLM
    from qserve.eval import perplexity

    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB)
    rtn = convert(outlier_model, tmp_path / "rtn", group_size=32, progress=False)
    out = convert(outlier_model, tmp_path / "awq", group_size=32, method="awq", calib=calib, progress=False)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["settings"]["method"] == "awq" and report["settings"]["calibration"]["seq_len"] == 256
    assert len(report["layers"]) == 2 * 7
    for module, entry in report["layers"].items():
        assert entry["awq_output_error"] <= entry["rtn_output_error"] * (1 + 1e-6), module
    assert report["summary"]["mean_awq_output_error"] < 0.9 * report["summary"]["mean_rtn_output_error"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == "awq"
    nll = {
        d.name: perplexity(LLM(str(d), device="cpu", dtype="float32"), HELDOUT, context=256).nll
        for d in (rtn, out)
    }
    # AWQ's perplexity win on this one tiny random model is within noise: adding `import os` to
    # qserve/config.py (nothing else) turned 8.374 vs 8.408 nats into 8.429 vs 8.408, deterministically.
    # Likely 1-ulp matmul differences (allocation alignment) flip near-tied choices in the scale grid. The
    # per-layer output errors above are the real check; this one guards against AWQ being materially worse.
    assert nll["awq"] < nll["rtn"] * 1.01


@pytest.mark.usefixtures("small_calibration")
def test_scale_folding_preserves_the_float_layer(
    outlier_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Apply the searched scales (no clipping, no quantizing): the layer's outputs must not change."""
    from qserve.config import ModelConfig
    from qserve.converters.plan import plan
    from qserve.converters.report import Report
    from qserve.converters.stream import SourceCheckpoint

    cfg = ModelConfig.from_pretrained(outlier_model)
    ckpt = SourceCheckpoint(outlier_model)
    target = Target("int4", 32)
    layer0 = [u for u in plan(ckpt, target) if u.layer == 0]
    tensors = {n: ckpt.read(n) for u in layer0 for n in u.inputs.values()}
    h = torch.randn(2, 64, cfg.hidden_size)
    monkeypatch.setattr(awq, "search_clip", lambda x, w, target, dtype: w)
    runner = awq._LayerRunner(cfg, 64)
    inputs, before = runner.run("model.layers.0", tensors, h)
    for group in awq.groups(cfg):
        awq.apply_group(group, "model.layers.0", tensors, inputs[group.captured], target, Report({}))
    _, after = runner.run("model.layers.0", tensors, h)
    assert float((after - before).abs().max()) <= 1e-5 * float(before.abs().max())  # float32 rounding only
