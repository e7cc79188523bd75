"""Float Linear: fused loading and the CPU prepacked paths (qserve's native kernel, oneDNN)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qserve.errors import QServeError
from qserve.kernels import cpu_native
from qserve.layers.linear import Linear, PanelEmbedding, prepack_cpu_linears


def test_fused_load_concatenates_shards() -> None:
    lin = Linear(4, 6, True, torch.float32, torch.device("cpu"))
    q = {"weight": torch.ones(2, 4), "bias": torch.zeros(2)}
    k = {"weight": 2 * torch.ones(4, 4), "bias": torch.ones(4)}
    lin.load([q, k])
    assert lin.weight[:, 0].tolist() == [1, 1, 2, 2, 2, 2]
    assert lin.bias is not None and lin.bias.tolist() == [0, 0, 1, 1, 1, 1]
    with pytest.raises(QServeError, match="does not match"):
        lin.load([q])


def tied_model() -> nn.Module:
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
    return model


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_onednn_prepack_is_bit_identical_and_skips_shared_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_native, "available", lambda: False)
    model = tied_model()
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    before = model.a(x)
    assert prepack_cpu_linears(model) == 1  # only `a`: `tied` shares the embedding, `f32` is fp32
    assert torch.equal(model.a(x), before) and not model.a._native
    assert model.tied._packed is None and model.f32._packed is None
    assert model.emb.weight.numel() == 50 * 32


@pytest.mark.skipif(not cpu_native.available(), reason="needs AVX512-BF16 and a C++ compiler")
def test_native_prepack_packs_the_tied_head_once() -> None:
    model = tied_model()
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    ids = torch.tensor([0, 17, 49, 3])
    before_a, before_tied, before_emb = model.a(x), model.tied(x), model.emb(ids)
    assert prepack_cpu_linears(model) == 2  # `a`, and `tied` with its embedding; `f32` stays
    assert model.a._native and model.tied._native and model.f32._packed is None
    assert isinstance(model.emb, PanelEmbedding) and model.emb.panels is model.tied._packed
    assert model.a.weight.numel() == 0 and model.tied.weight.numel() == 0  # one copy of the table, packed
    assert torch.equal(model.emb(ids), before_emb)  # rows are read back exactly
    assert torch.equal(model.emb(ids.view(2, 2)), before_emb.view(2, 2, 32))
    for after, before in ((model.a(x), before_a), (model.tied(x), before_tied)):
        torch.testing.assert_close(after, before, rtol=2**-7, atol=1e-2)
