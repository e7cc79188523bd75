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


@pytest.mark.parametrize("t", [0, 1, 7, 40])
def test_prepacked_bf16_experts_match_the_float_kind(t: int) -> None:
    """kind cpu-bf16 (oneDNN-packed experts, one tensor each) computes what the stacked bf16 experts do."""
    from qserve.layers.moe import FusedMoE

    if not torch.backends.mkldnn.is_available():
        pytest.skip("needs oneDNN")
    e, h, i, k = 8, 64, 32, 2
    g = torch.Generator().manual_seed(t)
    tensors = {
        f"{x}.{p}.weight": torch.randn(*(s), generator=g).to(torch.bfloat16) * 0.2
        for x in range(e)
        for p, s in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i)))
    }
    layers = []
    for _ in range(2):
        m = FusedMoE(e, h, i, None, torch.bfloat16, torch.device("cpu"))
        m.load_named(dict(tensors))
        layers.append(m)
    assert layers[1].prepack_cpu_experts() == e and layers[1].kind == "cpu-bf16" and layers[1].w13 is None
    assert layers[1].nbytes == layers[0].nbytes and layers[1].prepack_cpu_experts() == 0
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    ids = (
        torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k).long()
    )
    if t > 3:
        ids[1, 0] = -1  # a padded slot contributes nothing
    w = torch.rand(t, k, generator=g)
    want, got = layers[0](x, ids, w), layers[1](x, ids, w)
    assert got.shape == (t, h) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    compiled = torch.compile(lambda a, b, c: layers[1](a, b, c), fullgraph=True, dynamic=True)
    if t:
        torch.testing.assert_close(compiled(x, ids, w).float(), got.float(), rtol=0, atol=0)
