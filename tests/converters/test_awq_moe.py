"""--method awq on MoE models: per-expert statistics from the model's own routing, exact folding, no loss to RTN."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qserve.converters.awq as awq
import qserve.converters.awq_moe as awq_moe
import qserve.converters.awq_search as awq_search
from qserve.config import ModelConfig
from qserve.converters import QuantizedWeight, convert
from qserve.converters.plan import Target, plan
from qserve.converters.report import REPORT_NAME, Report
from qserve.converters.stream import SourceCheckpoint
from qserve.errors import QServeError

CALIB = (Path(__file__).parents[2] / "qserve" / "config.py").read_text()
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
EXPERT_LEAVES = ("w1", "w2", "w3", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def small_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(awq, "MAX_TOKENS", 512)
    monkeypatch.setattr(awq, "SEQ_LEN", 128)
    monkeypatch.setattr(awq_search, "SCALE_GRID", 8)
    monkeypatch.setattr(awq_search, "CLIP_GRID", 8)


def _outlier_moe(factory: Callable[..., Path], arch: str, out: Path) -> Path:
    """A tiny MoE model whose RMSNorm gains have a few large channels (the outliers AWQ targets)."""
    src = Path(shutil.copytree(factory(arch), out))
    t = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for name in t:
        if name.endswith("layernorm.weight"):
            t[name][torch.randperm(t[name].numel(), generator=g)[:3]] *= 8
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def _calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(CALIB)
    return path


def _hf_routed_tokens(src: Path, ids: torch.Tensor, layer: int, top_k: int) -> list[int]:
    """Calibration tokens per expert at ``layer`` by transformers' own router (independent of qserve)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    n_exp = int(getattr(model.config, "num_local_experts", None) or model.config.num_experts)
    counts = torch.zeros(n_exp, dtype=torch.long)
    with torch.no_grad():
        for seq in ids:
            logits = model(seq[None], output_router_logits=True).router_logits
            sparse = [r for r in logits if r is not None]
            top = torch.topk(torch.softmax(sparse[layer].float(), -1), top_k, -1).indices  # (T, k)
            counts += torch.bincount(top.reshape(-1), minlength=n_exp)
    return counts.tolist()


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.usefixtures("small_calibration")
def test_moe_awq_per_expert_statistics_and_errors(
    arch: str, tiny_model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    from qserve import LLM
    from qserve.eval import perplexity
    from qserve.layers.moe import FusedMoE

    src = _outlier_moe(tiny_model_factory, arch, tmp_path / "src")
    out = convert(src, tmp_path / "awq", group_size=32, method="awq", calib=_calib(tmp_path), progress=False)
    rtn = convert(src, tmp_path / "rtn", group_size=32, progress=False)
    cfg = ModelConfig.from_pretrained(src)
    assert cfg.moe is not None
    report = json.loads((out / REPORT_NAME).read_text())
    layers = report["layers"]
    seqs, seq_len = (
        report["settings"]["calibration"]["sequences"],
        report["settings"]["calibration"]["seq_len"],
    )
    ids = awq.calibration_ids(src, CALIB, 512, 128)
    assert tuple(ids.shape) == (seqs, seq_len)
    first_sparse = cfg.moe.sparse_layers[0]
    hf_counts = _hf_routed_tokens(src, ids, 0, cfg.moe.top_k)
    for layer in cfg.moe.sparse_layers:
        experts = {
            int(m.split(".experts.")[1].split(".")[0]): e
            for m, e in layers.items()
            if f".layers.{layer}." in m and ".experts." in m and m.endswith(("w1", "gate_proj"))
        }
        assert len(experts) == cfg.moe.num_experts
        tokens = [experts[e]["tokens"] for e in range(cfg.moe.num_experts)]
        assert sum(tokens) == seqs * seq_len * cfg.moe.top_k  # every token counted once per chosen expert
        if layer == first_sparse:
            assert tokens == hf_counts  # the model's own router decided which tokens each expert saw
    quantized = [m for m in layers if m.rpartition(".")[2] in EXPERT_LEAVES]
    assert quantized
    for module in quantized:  # per linear, per expert: no worse than RTN on the tokens it sees
        entry = layers[module]
        if ".experts." in module and entry["tokens"] == 0:
            assert "awq_output_error" not in entry
            continue
        assert entry["awq_output_error"] <= entry["rtn_output_error"], module
    assert report["summary"]["mean_awq_output_error"] < report["summary"]["mean_rtn_output_error"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == "awq"
    # The written model loads on the grouped int4 path and stays close to the float model.
    text = CALIB[:4000]
    base = perplexity(LLM(str(src), device="cpu"), text, context=128).nll
    llm = LLM(str(out), device="cpu")
    assert {m.kind for m in llm.engine.model.modules() if isinstance(m, FusedMoE)} == {"cpu-int4"}
    nll = perplexity(llm, text, context=128).nll
    nll_rtn = perplexity(LLM(str(rtn), device="cpu"), text, context=128).nll
    assert abs(nll - base) < 0.1 * base and nll < nll_rtn * 1.01, (nll, nll_rtn, base)


@pytest.mark.usefixtures("small_calibration")
def test_written_experts_beat_rtn_on_their_tokens(
    tiny_model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """From the checkpoints alone: each expert's whole output (gate, up, down) on its routed calibration
    tokens, AWQ's weights fed the AWQ model's norm output against RTN's: the mean error is lower."""
    src = _outlier_moe(tiny_model_factory, "mixtral", tmp_path / "src")
    out = convert(src, tmp_path / "awq", group_size=32, method="awq", calib=_calib(tmp_path), progress=False)
    rtn = convert(src, tmp_path / "rtn", group_size=32, progress=False)
    cfg = ModelConfig.from_pretrained(src)
    ckpt = SourceCheckpoint(src)
    layer0 = {
        n: ckpt.read(n) for u in plan(ckpt, Target("int4", 32)) if u.layer == 0 for n in u.inputs.values()
    }
    ids = awq.calibration_ids(src, CALIB)
    h = ckpt.read("model.embed_tokens.weight").float()[ids]
    inputs, _ = awq._LayerRunner(cfg, ids.shape[1]).run("model.layers.0", layer0, h, 0)
    x = inputs["mlp"]  # (T, H): the float model's MoE input
    a, r = load_file(str(out / "model.safetensors")), load_file(str(rtn / "model.safetensors"))
    norm = "model.layers.0.post_attention_layernorm.weight"
    x_awq = x * (a[norm].float() / layer0[norm].float())  # the AWQ model's norm output: x / s
    top = torch.topk(x @ layer0["model.layers.0.block_sparse_moe.gate.weight"].float().t(), 2, -1).indices

    def expert(t: dict[str, torch.Tensor], e: int, xe: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.0.block_sparse_moe.experts.{e}"
        w = {
            leaf: QuantizedWeight.from_tensors(
                {k: t[f"{p}.{leaf}.{k}"] for k in ("qweight", "scales", "qzeros")}, "int4", 32
            ).dequantize(torch.float32)
            for leaf in ("w1", "w2", "w3")
        }
        return (torch.nn.functional.silu(xe @ w["w1"].t()) * (xe @ w["w3"].t())) @ w["w2"].t()

    errs: dict[str, list[float]] = {"awq": [], "rtn": []}
    for e in range(cfg.moe.num_experts if cfg.moe else 0):
        rows = (top == e).any(-1)
        if not rows.any():
            continue
        p = f"model.layers.0.block_sparse_moe.experts.{e}"
        w1, w2, w3 = (layer0[f"{p}.{leaf}.weight"].float() for leaf in ("w1", "w2", "w3"))
        ref = (torch.nn.functional.silu(x[rows] @ w1.t()) * (x[rows] @ w3.t())) @ w2.t()
        for name, t, xe in (("awq", a, x_awq[rows]), ("rtn", r, x[rows])):
            errs[name].append(float((expert(t, e, xe) - ref).norm() / ref.norm()))
    assert len(errs["awq"]) >= 2
    assert sum(errs["awq"]) < sum(errs["rtn"]), errs


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.usefixtures("small_calibration")
def test_moe_scale_folding_preserves_the_float_layer(
    arch: str, tiny_model_factory: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Apply every searched scale of a sparse layer (no clipping, no quantizing): outputs must not change."""
    src = _outlier_moe(tiny_model_factory, arch, tmp_path / "src")
    cfg = ModelConfig.from_pretrained(src)
    assert cfg.moe is not None
    layer = cfg.moe.sparse_layers[0]
    ckpt = SourceCheckpoint(src)
    target = Target("int4", 32)
    units = [u for u in plan(ckpt, target) if u.layer == layer]
    tensors = {n: ckpt.read(n) for u in units for n in u.inputs.values()}
    prefix = f"model.layers.{layer}"
    torch.manual_seed(0)
    h = torch.randn(2, 64, cfg.hidden_size)
    monkeypatch.setattr(awq, "search_clip", lambda x, w, target, dtype: w)
    runner = awq._LayerRunner(cfg, 64)
    inputs, before = runner.run(prefix, tensors, h, layer)
    original = dict(tensors)
    report = Report({})
    for group in awq.groups(cfg, sparse=True):
        awq.apply_group(group, prefix, tensors, inputs[group.captured], target, report)
    awq_moe.apply_moe(cfg.moe, prefix, tensors, inputs["mlp"], target, report)
    changed = [n for n in tensors if not torch.equal(tensors[n].float(), original[n].float())]
    assert any(".experts." in n and n.endswith(("w1.weight", "gate_proj.weight")) for n in changed)
    assert any(n.endswith("post_attention_layernorm.weight") for n in changed)
    assert any(n.endswith(("moe.gate.weight", "mlp.gate.weight")) for n in changed)  # the router took s
    _, after = runner.run(prefix, tensors, h, layer)
    assert float((after - before).abs().max()) <= 1e-5 * float(before.abs().max())  # float32 rounding only


def test_stacked_experts_are_refused_before_writing(
    tiny_model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    src = Path(shutil.copytree(tiny_model_factory("qwen3_moe"), tmp_path / "src"))
    t = load_file(str(src / "model.safetensors"))
    for layer in (1, 3):
        p = f"model.layers.{layer}.mlp.experts"
        n = sum(1 for k in t if k.startswith(f"{p}.") and k.endswith("gate_proj.weight"))
        gate_up = [
            torch.cat([t.pop(f"{p}.{e}.gate_proj.weight"), t.pop(f"{p}.{e}.up_proj.weight")])
            for e in range(n)
        ]
        t[f"{p}.gate_up_proj"] = torch.stack(gate_up)
        t[f"{p}.down_proj"] = torch.stack([t.pop(f"{p}.{e}.down_proj.weight") for e in range(n)])
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QServeError, match="stacks all experts: use --method rtn"):
        convert(src, tmp_path / "q", method="awq", calib=_calib(tmp_path), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "src"]


@pytest.mark.usefixtures("small_calibration")
def test_failure_mid_moe_leaves_nothing(
    tiny_model_factory: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = awq_moe.search_shared_scale

    def fail_on_second(*args: object, **kw: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in layer 1")
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(awq_moe, "search_shared_scale", fail_on_second)
    (tmp_path / "work").mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        convert(tiny_model_factory("mixtral"), tmp_path / "work" / "q", group_size=32, method="awq",
                calib=_calib(tmp_path), progress=False)  # fmt: skip
    assert len(calls) == 2 and list((tmp_path / "work").iterdir()) == []
