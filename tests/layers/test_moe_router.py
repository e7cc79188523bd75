"""qserve.layers.moe.route is bit-identical to transformers' routers (Mixtral, Qwen2-MoE, Qwen3-MoE)."""

from __future__ import annotations

import pytest
import torch

from qserve.layers.moe import route


def _hf_router(arch: str, e: int, k: int, norm: bool):  # type: ignore[no-untyped-def]
    from transformers import AutoConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    kw = {"num_local_experts" if arch == "mixtral" else "num_experts": e}
    cfg = AutoConfig.for_model(arch, hidden_size=16, num_experts_per_tok=k, norm_topk_prob=norm, **kw)
    cls = {"mixtral": MixtralTopKRouter, "qwen2_moe": Qwen2MoeTopKRouter, "qwen3_moe": Qwen3MoeTopKRouter}[
        arch
    ]
    return cls(cfg)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("e", "k"), [(4, 1), (8, 2), (64, 8)])
def test_route_bitwise_equals_transformers(arch: str, norm: bool, dtype: torch.dtype, e: int, k: int) -> None:
    router = _hf_router(arch, e, k, norm)
    with torch.no_grad():
        router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(e + k))
        router = router.to(dtype)
        x = torch.randn(37, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
        x[5] = 0.0  # a padded row: ties everywhere, still routed deterministically
        _, hf_w, hf_ids = router(x)
        logits = torch.nn.functional.linear(x, router.weight)
        renorm = True if arch == "mixtral" else norm  # Mixtral always renormalises
        ids, w = route(logits, k, renorm, weights_in_float32=arch == "mixtral")
    assert torch.equal(ids, hf_ids)
    assert w.dtype == hf_w.dtype
    assert torch.equal(w, hf_w)
