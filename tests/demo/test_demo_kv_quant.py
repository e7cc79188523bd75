"""int8 KV on the demo model: greedy outputs match floating-point KV on at least 95% of tokens."""

from __future__ import annotations

import pytest

from qserve import LLM, SamplingParams
from qserve.demo import HELDOUT_TEXT, MODEL_DIR

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").is_file(), reason="demo model not built")


def test_int8_kv_greedy_matches_fp_kv() -> None:
    lines = [ln for ln in HELDOUT_TEXT.read_text().splitlines() if len(ln.strip()) > 20]
    prompts = lines[:: max(1, len(lines) // 16)][:16]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    ref = LLM("demo", dtype="float32", kv_cache_dtype="fp32").generate(prompts, params)
    got = LLM("demo", dtype="float32", kv_cache_dtype="int8").generate(prompts, params)
    same = sum(a == b for r, g in zip(ref, got, strict=True) for a, b in zip(r.token_ids, g.token_ids, strict=True))
    total = sum(len(r.token_ids) for r in ref)
    assert same / total >= 0.95, f"int8 KV matched {same}/{total} greedy tokens"
