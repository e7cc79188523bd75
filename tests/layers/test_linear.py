"""Float Linear: fused loading and the CPU prepacked (oneDNN) path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qserve.errors import QServeError
from qserve.layers.linear import Linear, prepack_cpu_linears


def test_fused_load_concatenates_shards() -> None:
    lin = Linear(4, 6, True, torch.float32, torch.device("cpu"))
    q = {"weight": torch.ones(2, 4), "bias": torch.zeros(2)}
    k = {"weight": 2 * torch.ones(4, 4), "bias": torch.ones(4)}
    lin.load([q, k])
    assert lin.weight[:, 0].tolist() == [1, 1, 2, 2, 2, 2]
    assert lin.bias is not None and lin.bias.tolist() == [0, 0, 1, 1, 1, 1]
    with pytest.raises(QServeError, match="does not match"):
        lin.load([q])


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_prepacked_bf16_is_bit_identical_and_skips_shared_weights() -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.emb = nn.Embedding(50, 32, dtype=torch.bfloat16)
    model.a = Linear(32, 48, True, torch.bfloat16, torch.device("cpu"))
    model.tied = Linear(32, 50, False, torch.bfloat16, torch.device("cpu"))
    model.tied.weight = model.emb.weight
    model.f32 = Linear(32, 8, False, torch.float32, torch.device("cpu"))
    for p in (model.a.weight, model.a.bias):
        assert p is not None
        p.data.normal_()
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    before = model.a(x)
    assert prepack_cpu_linears(model) == 1  # only `a`: `tied` shares the embedding, `f32` is fp32
    assert torch.equal(model.a(x), before)
    assert model.tied._packed is None and model.f32._packed is None
    assert model.emb.weight.numel() == 50 * 32
