"""The paged-attention custom ops (torch.ops.qserve.store_kv / paged_attention): registration, opcheck,
fake implementations, and torch.compile(fullgraph=True) through them.

Runs like test_paged_attention_triton.py (its `_interpreter` fixture, imported below, puts the kernels in
Triton's interpreter on CPU), on tiny shapes: opcheck runs each op several times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")

from qserve.kernels.attention import KVLayout, paged_attention_ref  # noqa: E402
from qserve.kernels.paged_attention import paged_attention_triton, store_kv_triton  # noqa: E402
from tests.kernels.test_paged_attention_triton import (  # noqa: E402
    DEVICE,
    SMALL,
    _interpreter,  # noqa: F401  (module-scoped autouse fixture: the interpreter for this module too)
    build,
    make_cache,
)

# two decodes (one crossing a 32-token split), then a prefill continuing a 6-token context
SEQ_LENS, QUERY_LENS = [5, 40, 15], [1, 1, 9]
LAUNCH = (16, 16, 16, 32, None, None)  # SMALL, as the op's decode_block_n .. num_stages


def attention_args(layout: KVLayout, q_dtype: torch.dtype = torch.float16) -> tuple[Any, ...]:
    """Positional args of torch.ops.qserve.paged_attention for a small mixed batch (hq 4, hkv 2)."""
    q, cache, tables, qsl = build(SEQ_LENS, QUERY_LENS, 4, 2, layout, q_dtype)
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32, device=DEVICE)
    qsl_t = torch.tensor(qsl, dtype=torch.int32, device=DEVICE)
    plain = (2, layout.head_dim**-0.5, layout.block_size, layout.head_dim, layout.bits, None, None)
    return (q, cache, tables, seq_lens, qsl_t, *plain, *LAUNCH)


def store_args(layout: KVLayout, t: int = 5, hkv: int = 2) -> tuple[Any, ...]:
    """Positional args of torch.ops.qserve.store_kv: t tokens into a 4-block cache, one slot skipped (-1)."""
    g = torch.Generator().manual_seed(1)
    k = torch.randn(t, hkv, layout.head_dim, generator=g).half().to(DEVICE)
    v = torch.randn(t, hkv, layout.head_dim, generator=g).half().to(DEVICE)
    cache = make_cache(hkv, 4, layout, torch.float16).zero_()
    slots = torch.randperm(4 * layout.block_size, generator=g)[:t]
    slots[1] = -1
    return (k, v, cache, slots.to(DEVICE), layout.block_size, layout.head_dim, layout.bits)


def test_ops_are_registered_with_their_mutations() -> None:
    store = torch.ops.qserve.store_kv.default._schema
    attend = torch.ops.qserve.paged_attention.default._schema
    written = {a.name for a in store.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"kv_cache"}
    assert not any(a.alias_info is not None for a in attend.arguments)
    assert [r.type.kind() for r in attend.returns] == ["TensorType"]


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_opcheck_store_kv(bits: int) -> None:
    torch.library.opcheck(torch.ops.qserve.store_kv.default, store_args(KVLayout(4, 32, bits)))


@pytest.mark.parametrize("bits", [0, 4])
def test_opcheck_paged_attention(bits: int) -> None:
    torch.library.opcheck(torch.ops.qserve.paged_attention.default, attention_args(KVLayout(8, 32, bits)))


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_store_then_attend_matches_eager(compiler: str) -> None:
    """One graph holding both ops (fullgraph: no breaks), same output and cache as eager. Inductor keeps the
    ops opaque and compiles the rest (a C++ build on CPU: ~10 s on 2 cores)."""
    layout = KVLayout(8, 32, 8)
    q, cache, tables, seq_lens, qsl = attention_args(layout)[:5]
    # this step's K/V: the last token of each decode, the prefill's 9 tokens (overwritten with new values)
    pos = torch.tensor([4, 39, *range(6, 15)])
    seq = torch.tensor([0, 1] + [2] * 9)
    slots = (tables[seq, pos // layout.block_size].long() * layout.block_size + pos % layout.block_size).to(
        DEVICE
    )
    g = torch.Generator().manual_seed(2)
    k, v = (torch.randn(11, 2, 32, generator=g).half().to(DEVICE) for _ in range(2))

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        store_kv_triton(k, v, cache, slots, layout)
        return paged_attention_triton(q, cache, tables, seq_lens, qsl, 2, 0.125, layout, config=SMALL) * 2

    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        graphs.append(gm)
        return torch._dynamo.lookup_backend(compiler)(gm, example_inputs)

    eager_cache = cache.clone()
    want = step(q, k, v, eager_cache)
    got = torch.compile(step, backend=backend, fullgraph=True)(q, k, v, cache)
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.qserve.store_kv in targets and torch.ops.qserve.paged_attention in targets  # opaque ops
    assert torch.equal(cache, eager_cache)  # the compiled store wrote the caller's cache
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    ref = paged_attention_ref(q, eager_cache, tables, SEQ_LENS, [0, 1, 2, 11], 0.125, layout) * 2
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(("bits", "dtype"), [(0, torch.bfloat16), (4, torch.float32)])
def test_fake_impls_give_shapes_and_dtypes(
    bits: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    layout = KVLayout(8, 32, bits)
    real = attention_args(layout, dtype)
    k, v, cache, slots = store_args(layout)[:4]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # fakes run no kernel: no interpreter or GPU needed
    with FakeTensorMode() as mode:
        q, fcache, tables, seq_lens, qsl = (mode.from_tensor(x) for x in real[:5])
        out = paged_attention_triton(q, fcache, tables, seq_lens, qsl, 2, 0.125, layout)
        assert out.shape == (11, 4, 32) and out.dtype == dtype and out.device == q.device
        fk, fv, fslots = (mode.from_tensor(x) for x in (k, v, slots))
        store_kv_triton(fk, fv, mode.from_tensor(cache), fslots, layout)  # checks only, returns None
        with pytest.raises(ValueError, match="multiple of KV heads"):
            paged_attention_triton(q[:, :3], fcache, tables, seq_lens, qsl, 2, 0.125, layout)
        with pytest.raises(ValueError, match="slot_mapping"):
            store_kv_triton(fk, fv, mode.from_tensor(cache), fslots[:2], layout)
