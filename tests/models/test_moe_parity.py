"""MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE): greedy outputs token-identical to transformers in float32."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qserve import LLM
from qserve.config import ModelConfig
from qserve.layers.moe import FusedMoE
from qserve.models.moe import SparseMoeBlock
from tests.models.test_hf_parity import GREEDY, hf_greedy, prompts

MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_matches_transformers_batched(arch: str, tiny_model_factory: Callable[..., Path]) -> None:
    path = tiny_model_factory(arch)
    batch = prompts(6)  # mixed lengths 1..64, prefilled together
    llm = LLM(str(path), kv_cache_memory=1 << 20, dtype="float32")
    ours = [o.token_ids for o in llm.generate(prompt_token_ids=batch, sampling_params=GREEDY)]
    assert ours == hf_greedy(path, batch)


def test_sparse_layers_follow_the_config(tiny_model_factory: Callable[..., Path]) -> None:
    # qwen2_moe: mlp_only_layers=[1]; qwen3_moe: decoder_sparse_step=2 of 4 layers; mixtral: all layers
    expect = {
        "mixtral": [True, True],
        "qwen2_moe": [True, False, True],
        "qwen3_moe": [False, True, False, True],
    }
    for arch, sparse in expect.items():
        llm = LLM(str(tiny_model_factory(arch)), kv_cache_memory=1 << 20, dtype="float32")
        layers = llm.engine.model.model.layers
        assert [isinstance(layer.mlp, SparseMoeBlock) for layer in layers] == sparse
        shared = [
            layer.mlp.shared_expert is not None for layer in layers if isinstance(layer.mlp, SparseMoeBlock)
        ]
        assert all(shared) == (arch == "qwen2_moe")
        assert {m.kind for m in llm.engine.model.modules() if isinstance(m, FusedMoE)} == {"float"}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_preemption_and_chunking_keep_outputs(arch: str, tiny_model_factory: Callable[..., Path]) -> None:
    path = tiny_model_factory(arch)
    batch = prompts(8)
    roomy = LLM(str(path), kv_cache_memory=1 << 20, dtype="float32")
    expected = [o.token_ids for o in roomy.generate(prompt_token_ids=batch, sampling_params=GREEDY)]
    cfg = ModelConfig.from_pretrained(path)
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    # 14 blocks of 16 tokens: far less than 8 sequences of up to 128 tokens need.
    tight = LLM(str(path), kv_cache_memory=14 * 16 * per_token, max_num_batched_tokens=64, dtype="float32")
    got = [o.token_ids for o in tight.generate(prompt_token_ids=batch, sampling_params=GREEDY)]
    assert tight.metrics()["preemptions_total"] > 0
    assert got == expected
    assert got[:3] == hf_greedy(path, batch[:3])


def test_bf16_moe_runs(tiny_model_factory: Callable[..., Path]) -> None:
    path = tiny_model_factory("qwen3_moe", dtype=torch.bfloat16)
    llm = LLM(str(path), kv_cache_memory=1 << 20)
    assert llm.engine.dtype_name == "bfloat16"
    batch = prompts(4)
    out = llm.generate(prompt_token_ids=batch, sampling_params=GREEDY)
    assert all(len(o.token_ids) == 64 for o in out)


def test_config_refuses_bad_top_k(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    import shutil

    from qserve.errors import QServeError
    from tests.tiny_models import rewrite_config

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_factory("mixtral"), bad)
    rewrite_config(bad, num_experts_per_tok=9)
    with pytest.raises(QServeError, match="num_experts_per_tok 9"):
        ModelConfig.from_pretrained(bad)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_padded_rows_do_not_change_real_rows_and_block_compiles(
    arch: str, tiny_model_factory: Callable[..., Path]
) -> None:
    """Token rows of no sequence (zeros, as a padded bucket holds) route harmlessly; the block has no graph break."""
    llm = LLM(str(tiny_model_factory(arch)), kv_cache_memory=1 << 20, dtype="float32")
    block = next(m for m in llm.engine.model.modules() if isinstance(m, SparseMoeBlock))
    x = torch.randn(5, llm.engine.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    padded = torch.cat([x, torch.zeros(3, x.shape[1])])  # (8, H): 3 padded rows
    with torch.no_grad():
        base, out = block(x), block(padded)
        torch.testing.assert_close(out[:5], base, atol=1e-6, rtol=1e-5)
        assert torch.isfinite(out).all()
        compiled = torch.compile(block, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(padded), out, atol=1e-6, rtol=1e-5)
