"""bitsandbytes checkpoints (nf4 / fp4, with and without double quantization, LLM.int8) saved by transformers:
qserve loads them and agrees with transformers + bitsandbytes on the next token, teacher-forced."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qserve import LLM, SamplingParams
from qserve.layers.bnb_linear import Bnb4bitLinear
from tests.models.test_hf_parity import prompts

pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")

CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


def quantize_with_transformers(src: Path, out: Path, **bnb: object) -> torch.nn.Module:
    """transformers + bitsandbytes quantize ``src`` on load; saved to ``out``. Returns the bnb model."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(**bnb, bnb_4bit_compute_dtype=torch.float32)  # type: ignore[arg-type]
    model = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=cfg, dtype=torch.float32)
    model.save_pretrained(str(out))
    for f in src.glob("tok*"):
        shutil.copy(f, out)
    return model.eval()


def teacher_forced_agreement(hf: torch.nn.Module, llm: LLM, batch: list[list[int]]) -> float:
    """Share of prompt positions whose top-1 next token is the same in both runtimes."""
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    outs = llm.generate(prompt_token_ids=batch, sampling_params=sp)
    same = total = 0
    for p, o in zip(batch, outs, strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].argmax(-1).tolist()  # (T,) next token after each position
        assert o.prompt_logprobs is not None
        ours = [
            max(lp.top, key=lp.top.__getitem__) for lp in o.prompt_logprobs[1:]
        ]  # position i predicts i+1
        ours.append(o.token_ids[0])  # the last position's prediction is the generated token
        same += sum(a == b for a, b in zip(ours, ref, strict=True))
        total += len(ref)
    return same / total


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_bnb_checkpoint_agrees_with_transformers(
    kind: str, tiny_model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    src = tiny_model_factory("llama")
    hf = quantize_with_transformers(src, tmp_path / kind, **CONFIGS[kind])
    llm = LLM(str(tmp_path / kind), kv_cache_memory=1 << 20, dtype="float32")
    layer = llm.engine.model.model.layers[0].self_attn.qkv_proj
    assert type(layer).__name__ == ("Bnb8bitLinear" if kind == "int8" else "Bnb4bitLinear")
    agreement = teacher_forced_agreement(hf, llm, prompts(8))
    assert agreement >= 0.95, agreement


def test_convert_nf4_matches_bitsandbytes(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    """`qserve convert --weights nf4` writes exactly what transformers + bitsandbytes write, and both load it."""
    import json

    from transformers import AutoModelForCausalLM

    from qserve.converters import convert
    from qserve.converters.report import REPORT_NAME
    from tests.converters.test_convert import _tensors

    src = tiny_model_factory("qwen2")  # q/k/v biases, tied embeddings
    ours = convert(src, tmp_path / "ours", weights="nf4", progress=False)
    hf = quantize_with_transformers(src, tmp_path / "hf", **CONFIGS["nf4"])
    a, b = _tensors(ours), _tensors(tmp_path / "hf")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    q = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["bnb_4bit_quant_type"] == "nf4" and q["load_in_4bit"]
    report = json.loads((ours / REPORT_NAME).read_text())
    assert len(report["layers"]) == 2 * 7 and report["summary"]["max_rel_error"] < 0.12
    reloaded = AutoModelForCausalLM.from_pretrained(
        str(ours), dtype=torch.float32
    ).eval()  # transformers reads it
    llm = LLM(str(ours), kv_cache_memory=1 << 20, dtype="float32")
    assert teacher_forced_agreement(reloaded, llm, prompts(4)) >= 0.95
    assert teacher_forced_agreement(hf, llm, prompts(4)) >= 0.95


def test_convert_nf4_errors(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    from qserve.converters import convert
    from qserve.errors import QServeError

    with pytest.raises(QServeError, match="--group-size/--method do not apply"):
        convert(tiny_model_factory("llama"), tmp_path / "a", weights="nf4", group_size=64, progress=False)
    with pytest.raises(QServeError, match="nf4 does not support MoE"):
        convert(tiny_model_factory("mixtral"), tmp_path / "b", weights="nf4", progress=False)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "fp4", "fp4-dq"])
def test_triton_kernel_path_matches_bitsandbytes(
    kind: str, tiny_model_factory: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layer's CUDA branch (qserve's Triton NF4 / FP4 kernel), reached on CPU in Triton's interpreter,
    computes what bitsandbytes' own Linear4bit does on the same tensors; the whole model still agrees with
    transformers + bitsandbytes."""
    pytest.importorskip("triton")
    import bitsandbytes.functional as bf

    from qserve.layers.bnb_linear import Bnb4bitLinear

    src = tiny_model_factory("llama")
    hf = quantize_with_transformers(src, tmp_path / kind, **CONFIGS[kind])
    llm = LLM(str(tmp_path / kind), kv_cache_memory=1 << 20, dtype="float32")
    layers = [m for m in llm.engine.model.modules() if isinstance(m, Bnb4bitLinear)]
    assert len(layers) == 2 * 4 and all(m.kernel_weights is None for m in layers)  # CPU: bitsandbytes
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        x = torch.randn(5, layer.in_features, generator=g)
        parts = [bf.dequantize_4bit(lin.weight.data, lin.weight.quant_state) for lin in layer.parts]
        exact = x @ torch.cat(parts).float().t()  # bitsandbytes' dequantized weight, a float32 matmul
        layer.use_kernel()
        kernel = layer.kernel_weights
        assert kernel is not None and kernel[0].nested == kind.endswith("-dq")
        ours = layer(x)
        torch.testing.assert_close(ours, exact, rtol=1e-4, atol=1e-4)
        layer.kernel_weights = None
        theirs = layer(x)  # bitsandbytes' own CPU GEMM (it runs in bf16)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-2 * float(exact.abs().max()))
        layer.kernel_weights = kernel
        if getattr(layer.parts[0].weight.quant_state, "packing_format_for_cpu", False):  # AVX512-bf16 CPUs
            with pytest.raises(RuntimeError, match="before the first forward"):
                layer.use_kernel()  # bitsandbytes has re-packed the weight for its CPU kernel by now
    assert teacher_forced_agreement(hf, llm, prompts(4)) >= 0.95


def test_default_compiled_engine_runs_bnb_checkpoints_eager(
    tiny_model_factory: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default (compiled) CPU engine used to fail at warm-up on a bnb 4-bit checkpoint (inductor's graph
    expected bitsandbytes' re-packed weight shapes); it now runs those eagerly, with the same tokens."""
    src = tiny_model_factory("llama")
    quantize_with_transformers(src, tmp_path / "nf4", **CONFIGS["nf4"])
    monkeypatch.delenv("QSERVE_ENFORCE_EAGER", raising=False)
    default = LLM(str(tmp_path / "nf4"), kv_cache_memory=1 << 20, dtype="float32")
    assert default.engine.runner.compiled is None
    eager = LLM(str(tmp_path / "nf4"), kv_cache_memory=1 << 20, dtype="float32", enforce_eager=True)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    batch = prompts(3)
    assert [o.token_ids for o in default.generate(prompt_token_ids=batch, sampling_params=sp)] == [
        o.token_ids for o in eager.generate(prompt_token_ids=batch, sampling_params=sp)
    ]


@pytest.mark.parametrize(
    ("arch", "kind"), [("mixtral", "nf4"), ("qwen2_moe", "nf4-dq"), ("qwen2_moe", "int8")]
)
def test_bnb_moe_checkpoints_agree_with_transformers(
    arch: str, kind: str, tiny_model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """transformers v5 + bitsandbytes quantize an MoE model's nn.Linear modules only: attention, Qwen2-MoE's
    shared expert and its (1, H) gate; the router and the fused experts stay float. qserve reads exactly that."""
    from bitsandbytes.nn import Linear4bit

    from qserve.layers.bnb_linear import Bnb8bitLinear
    from qserve.layers.moe import FusedMoE
    from qserve.models.moe import SparseMoeBlock

    hf = quantize_with_transformers(tiny_model_factory(arch), tmp_path / kind, **CONFIGS[kind])
    for (
        m
    ) in hf.modules():  # bitsandbytes' AVX512-bf16 CPU GEMM asserts N % 32 == 0: its generic path, as ours
        if isinstance(m, Linear4bit) and m.out_features % 32:
            m.support_avx512bf16_for_cpu = False
    llm = LLM(str(tmp_path / kind), kv_cache_memory=1 << 20, dtype="float32")
    assert {m.kind for m in llm.engine.model.modules() if isinstance(m, FusedMoE)} == {"float"}
    quantized = Bnb8bitLinear if kind == "int8" else Bnb4bitLinear
    for block in (m for m in llm.engine.model.modules() if isinstance(m, SparseMoeBlock)):
        assert type(block.gate).__name__ == "Linear"
        if arch == "qwen2_moe":
            assert isinstance(block.shared_expert_gate, quantized)
            assert isinstance(block.shared_expert.gate_up_proj, quantized)  # type: ignore[union-attr]
    assert teacher_forced_agreement(hf, llm, prompts(6)) >= 0.95


def test_bnb_4bit_experts_and_misplaced_codes_are_refused() -> None:
    """Per-expert bitsandbytes 4-bit weights (transformers < 5 wrote them) get a clear error, and integer codes
    never load into a float layer as numbers."""
    from qserve.errors import QServeError
    from qserve.kernels.packing import QuantSpec
    from qserve.layers.linear import Linear
    from qserve.layers.moe import FusedMoE

    spec = QuantSpec.from_config(
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    )
    layer = FusedMoE(2, 64, 32, spec, torch.float32, torch.device("cpu"))
    packed = {"0.w1.weight": torch.zeros(1024, 1, dtype=torch.uint8), "0.w1.weight.absmax": torch.ones(32)}
    with pytest.raises(QServeError, match="bitsandbytes nf4 expert weights .* not supported"):
        layer.load_named(packed)
    lin = Linear(64, 8, False, torch.float32, torch.device("cpu"))
    with pytest.raises(QServeError, match="float layer got torch.int8 weights with \\['SCB'\\]"):
        lin.load([{"weight": torch.zeros(8, 64, dtype=torch.int8), "SCB": torch.ones(8)}])
    with pytest.raises(QServeError, match="float layer got torch.uint8"):
        lin.load([{"weight": torch.zeros(8, 64, dtype=torch.uint8)}])


def test_cli_convert_nf4_then_generate_print_no_bitsandbytes_noise(
    tiny_model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """The CLI end to end in fresh processes: stderr stays empty (bitsandbytes' import-time warning about an
    optional Hub kernel is silenced on CPUs that have AVX512-bf16), and bad input is one `error:` line."""
    import subprocess
    import sys

    def qserve(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "qserve.cli", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    out = tmp_path / "nf4"
    r = qserve("convert", str(tiny_model_factory("llama")), str(out), "--weights", "nf4", "--no-progress")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith(f"wrote {out} (nf4, bitsandbytes): 14 linear layers")
    r = qserve("generate", str(out), "hi", "--max-tokens", "4")
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("hi"), r.stderr
    r = qserve("convert", str(out), str(tmp_path / "again"), "--no-progress")
    assert r.returncode == 2 and r.stderr.startswith("error: SRC is a bitsandbytes nf4 checkpoint")
    assert len(r.stderr.strip().splitlines()) == 1
    # LLM.int8: bitsandbytes would log "inputs will be cast ... to float16" on every matmul
    quantize_with_transformers(tiny_model_factory("llama"), tmp_path / "int8", **CONFIGS["int8"])
    r = qserve("generate", str(tmp_path / "int8"), "hi", "--max-tokens", "4")
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("hi"), r.stderr[-2000:]


def test_bnb_int8_layer_errors_and_parts() -> None:
    """Bnb8bitLinear: q/k/v parts with biases and a float part (a skipped module) concatenate in order;
    layouts that are not LLM.int8 are refused with a clear error."""
    import bitsandbytes.functional as bf

    from qserve.errors import QServeError
    from qserve.kernels.packing import QuantSpec
    from qserve.layers.bnb_linear import Bnb8bitLinear

    spec = QuantSpec.from_config({"quant_method": "bitsandbytes", "load_in_8bit": True})
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, 64, generator=g) * 0.1 for n in (32, 16, 16)]
    biases = [torch.randn(w.shape[0], generator=g) for w in ws]
    shards: list[dict[str, torch.Tensor]] = []
    for j, (w, b) in enumerate(zip(ws, biases, strict=True)):
        if j == 2:  # left float by the checkpoint
            shards.append({"weight": w, "bias": b})
            continue
        cb, scb, _ = bf.int8_vectorwise_quant(w.half())
        shards.append({"weight": cb, "SCB": scb, "bias": b})
    layer = Bnb8bitLinear(64, 64, True, spec, torch.float32, "cpu")
    layer.load(shards)
    x = torch.randn(2, 3, 64, generator=g) * 0.5  # below the outlier threshold: plain int8 x int8
    ref = torch.cat([x @ w.t() + b for w, b in zip(ws, biases, strict=True)], dim=-1)
    y = layer(x)
    assert y.shape == (2, 3, 64) and y.dtype == torch.float32
    torch.testing.assert_close(y[..., 48:], ref[..., 48:], atol=1e-5, rtol=1e-5)  # the float part: exact
    torch.testing.assert_close(y, ref, atol=0.05 * float(ref.abs().max()), rtol=0)
    assert layer.nbytes == 32 * 64 + 16 * 64 + 4 * (32 + 16 + 32 + 16) + 4 * (16 * 64 + 16)
    with pytest.raises(QServeError, match="not a bitsandbytes LLM.int8 layout"):
        Bnb8bitLinear(64, 32, False, spec, torch.float32, "cpu").load([{"weight": shards[0]["weight"]}])
    with pytest.raises(QServeError, match="have 32 outputs, layer expects 48"):
        Bnb8bitLinear(64, 48, False, spec, torch.float32, "cpu").load(
            [{"weight": shards[0]["weight"], "SCB": shards[0]["SCB"]}]
        )
    with pytest.raises(QServeError, match="expects a \\(N, 64\\) weight"):
        Bnb8bitLinear(64, 32, False, spec, torch.float32, "cpu").load([{"weight": torch.zeros(32, 8)}])
    with pytest.raises(RuntimeError, match="before load"):
        Bnb8bitLinear(64, 32, False, spec, torch.float32, "cpu")(x)
