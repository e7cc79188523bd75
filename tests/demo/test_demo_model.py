"""The bundled demo model: it loads with our runtime and with transformers, they agree, and it has learned."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qserve import LLM, SamplingParams
from qserve.config import resolve_model_path
from qserve.demo import CALIB_TEXT, HELDOUT_TEXT, MODEL_DIR
from qserve.eval import perplexity

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "model.safetensors").is_file(), reason="demo model not built"
)
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, item):"]


@pytest.fixture(scope="module")
def demo_fp32() -> LLM:
    return LLM("demo", dtype="float32", kv_cache_memory=64 << 20)


def test_demo_word_resolves_and_files_ship() -> None:
    assert resolve_model_path("demo") == MODEL_DIR
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 25 * 2**20
    assert 0 < HELDOUT_TEXT.stat().st_size <= 2**20
    assert 0 < CALIB_TEXT.stat().st_size <= 256 * 2**10


def test_greedy_matches_transformers_fp32(demo_fp32: LLM) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    hf = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    ours = demo_fp32.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, ours, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        ref = hf.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out.token_ids == ref[0, ids.shape[1] :].tolist()


def test_completes_python(demo_fp32: LLM) -> None:
    out = demo_fp32.generate(["def fibonacci(n):"], SamplingParams(max_tokens=48, temperature=0.0))[0]
    assert "return" in out.text or "if" in out.text or "n" in out.text


def test_heldout_perplexity_far_below_untrained(demo_fp32: LLM, tmp_path: Path) -> None:
    text = HELDOUT_TEXT.read_text()
    trained = perplexity(demo_fp32, text, context=512, max_tokens=4096)
    # an untrained model of the same shape: the same directory with freshly initialised weights
    from transformers import AutoConfig, AutoModelForCausalLM

    untrained_dir = tmp_path / "untrained"
    shutil.copytree(MODEL_DIR, untrained_dir)
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(MODEL_DIR)), dtype=torch.float32)
    fresh.save_pretrained(str(untrained_dir))
    untrained = perplexity(LLM(str(untrained_dir), dtype="float32"), text, context=512, max_tokens=4096)
    assert trained.tokens == untrained.tokens > 4000
    assert trained.perplexity * 50 < untrained.perplexity
