"""Triton paged attention (kernels/paged_attention*.py) against the pure-torch references.

Without CUDA the kernels run in Triton's interpreter on CPU tensors, so shapes stay tiny and tiles shrink
(16 keys, 32-token decode splits) to cross tile, block and split boundaries at small lengths. The interpreter
is chosen when a kernel is decorated: `_interpreter` imports the kernel modules with TRITON_INTERPRET=1 and
keeps it set for this module only (left set for the session, it would send every CPU QuantLinear in other
tests through the interpreter). `gpu` tests repeat the checks at realistic sizes on CUDA.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from qserve.kernels import paged_attention
from qserve.kernels.attention import KVLayout, paged_attention_ref, store_kv
from qserve.kernels.kv_quant import block_bytes, store_kv_quant
from qserve.kernels.paged_attention import (
    AttentionConfig,
    decode_partition,
    paged_attention_triton,
    store_kv_triton,
    supports,
)

triton = pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_MODULES = [  # dependency order: decode and prefill import common's device functions
    "qserve.kernels.paged_attention_common",
    "qserve.kernels.paged_attention_decode",
    "qserve.kernels.paged_attention_prefill",
    "qserve.kernels.paged_attention_store",
]
SMALL = AttentionConfig(decode_block_n=16, prefill_block_m=16, prefill_block_n=16, partition_size=32)
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def _interpreter() -> Iterator[None]:
    """On CPU: TRITON_INTERPRET=1 for this module, kernels decorated in interpreter mode, bf16 fixes."""
    if DEVICE.type == "cuda":
        yield
        return
    import triton.language as tl
    import triton.language.standard as tl_standard
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        for name in KERNEL_MODULES:
            module = sys.modules.get(name)
            if module is None:
                importlib.import_module(name)
            elif not any(isinstance(v, InterpretedFunction) for v in vars(module).values()):
                importlib.reload(module)  # imported compiled by someone else first
        # triton's own library (tl.zeros, tl.sum, ...) is @jit code decorated when triton was imported,
        # usually before this module ran: swap in interpreted copies, as the kernels need
        copies: dict[int, InterpretedFunction] = {}
        for namespace in (tl, tl_standard):
            for name, fn in list(vars(namespace).items()):
                if isinstance(fn, JITFunction):
                    mp.setattr(namespace, name, copies.setdefault(id(fn), InterpretedFunction(fn.fn)))
        _patch_interpreter_bf16(mp)
        yield


def _patch_interpreter_bf16(mp: pytest.MonkeyPatch) -> None:
    """Work around two bf16 bugs of Triton 3.9's interpreter (bf16 is stored as uint16 there): tl.dot
    multiplies the raw uint16 bit patterns, and int -> bf16 casts copy the integer into the bits (float ->
    bf16 truncates). Casts touching bf16 and dots on bf16 go through torch instead."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    to_torch = {
        tl.float16: torch.float16,
        tl.bfloat16: torch.bfloat16,
        tl.float32: torch.float32,
        tl.uint8: torch.uint8,
        tl.int8: torch.int8,
        tl.int16: torch.int16,
        tl.int32: torch.int32,
        tl.int64: torch.int64,
    }

    def as_torch(h: interp.TensorHandle) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(h.data))
        return x.view(torch.bfloat16) if h.dtype.scalar == tl.bfloat16 else x

    def as_handle(x: torch.Tensor, ty: tl.dtype) -> interp.TensorHandle:
        if ty == tl.bfloat16:
            return interp.TensorHandle(x.view(torch.int16).numpy().view(np.uint16), ty)
        return interp.TensorHandle(x.numpy(), ty)

    orig_cast, orig_dot = interp.InterpreterBuilder.cast_impl, interp.InterpreterBuilder.create_dot

    def cast_impl(self: object, src: interp.TensorHandle, dst_type: tl.dtype) -> interp.TensorHandle:
        s, d = src.dtype.scalar, dst_type.scalar
        if s != d and tl.bfloat16 in (s, d) and s in to_torch and d in to_torch:
            return as_handle(as_torch(src).to(to_torch[d]), d)
        return orig_cast(self, src, dst_type)

    def create_dot(self: object, a: interp.TensorHandle, b: interp.TensorHandle, *args: object) -> object:
        def up(h: interp.TensorHandle) -> interp.TensorHandle:
            return as_handle(as_torch(h).float(), tl.float32) if h.dtype.scalar == tl.bfloat16 else h

        return orig_dot(self, up(a), up(b), *args)

    mp.setattr(interp.InterpreterBuilder, "cast_impl", cast_impl)
    mp.setattr(interp.InterpreterBuilder, "create_dot", create_dot)


def make_cache(hkv: int, num_blocks: int, layout: KVLayout, dtype: torch.dtype) -> torch.Tensor:
    """A cache poisoned with NaN (float) / 0xFF bytes (int8/int4: NaN scales) so stale slots cannot leak."""
    if layout.bits:
        nbytes = block_bytes(layout.block_size, layout.head_dim, layout.bits)
        return torch.full((2, hkv, num_blocks, nbytes), 0xFF, dtype=torch.uint8, device=DEVICE)
    shape = (2, hkv, num_blocks, layout.block_size, layout.head_dim)
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def build(
    seq_lens: list[int],
    query_lens: list[int],
    hq: int,
    hkv: int,
    layout: KVLayout,
    q_dtype: torch.dtype,
    cache_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """q (T, Hq, D) and a cache holding every sequence's K/V in shuffled blocks (written by the reference)."""
    g = torch.Generator().manual_seed(seed)
    bs, d = layout.block_size, layout.head_dim
    num_blocks = sum(-(-n // bs) for n in seq_lens) + 2
    cache = make_cache(hkv, num_blocks, layout, cache_dtype or q_dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(seq_lens), max(-(-n // bs) for n in seq_lens) + 1, dtype=torch.int32)
    for i, n in enumerate(seq_lens):
        for j in range(-(-n // bs)):
            tables[i, j] = perm.pop()
        slots = tables[i, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs
        k = torch.randn(n, hkv, d, generator=g) * 2 + 0.5
        v = torch.randn(n, hkv, d, generator=g)
        store_kv(k.to(q_dtype).to(DEVICE), v.to(q_dtype).to(DEVICE), cache, slots.to(DEVICE), layout)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], hq, d, generator=g).to(q_dtype).to(DEVICE)
    return q, cache, tables.to(DEVICE), qsl


def run_and_compare(
    seq_lens: list[int],
    query_lens: list[int],
    num_decodes: int,
    hq: int,
    hkv: int,
    layout: KVLayout,
    q_dtype: torch.dtype,
    cache_dtype: torch.dtype | None = None,
    window: int | None = None,
    config: AttentionConfig | None = SMALL,
    index_dtype: torch.dtype = torch.int32,
) -> None:
    q, cache, tables, qsl = build(seq_lens, query_lens, hq, hkv, layout, q_dtype, cache_dtype)
    scale = layout.head_dim**-0.5
    ref = paged_attention_ref(q, cache, tables, seq_lens, qsl, scale, layout, window)
    out = torch.full_like(q, float("nan"))  # every element must be written
    got = paged_attention_triton(
        q,
        cache,
        tables,
        torch.tensor(seq_lens, dtype=index_dtype, device=DEVICE),
        torch.tensor(qsl, dtype=index_dtype, device=DEVICE),
        num_decodes,
        scale,
        layout,
        window,
        config=config,
        out=out,
    )
    assert got is out and not out.isnan().any()
    tol = TOL[q_dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


# three decodes (one crossing a 32-token split, two crossing blocks), then a full prefill, a chunk
# continuing a 24-token context, and a short prefill
SEQ_LENS, QUERY_LENS = [5, 40, 17, 20, 33, 3], [1, 1, 1, 20, 9, 3]

CASES = [
    # bits, q dtype, cache dtype, block_size, head_dim, hq, hkv
    (0, torch.float32, None, 8, 64, 4, 4),
    (0, torch.float16, None, 16, 128, 8, 2),
    (0, torch.bfloat16, None, 8, 64, 4, 1),
    (0, torch.float16, torch.float32, 8, 64, 4, 2),
    (8, torch.float32, None, 8, 64, 2, 2),
    (8, torch.float16, None, 8, 64, 4, 1),
    (8, torch.bfloat16, None, 16, 128, 8, 2),
    (4, torch.float32, None, 16, 64, 4, 1),
    (4, torch.float16, None, 8, 128, 8, 2),
    (4, torch.bfloat16, None, 16, 64, 4, 4),
]


@pytest.mark.parametrize(("bits", "q_dtype", "cache_dtype", "bs", "d", "hq", "hkv"), CASES)
def test_attention_matches_reference(
    bits: int, q_dtype: torch.dtype, cache_dtype: torch.dtype | None, bs: int, d: int, hq: int, hkv: int
) -> None:
    run_and_compare(SEQ_LENS, QUERY_LENS, 3, hq, hkv, KVLayout(bs, d, bits), q_dtype, cache_dtype)


@pytest.mark.parametrize("bits", [0, 8, 4])
def test_many_prefills_odd_group_and_block(bits: int) -> None:
    # five prefills of mixed lengths exercise the tile -> sequence search; GQA group 3 pads to 4 rows;
    # block size 12 is not a power of two; int64 index tensors
    seq_lens, query_lens = [1, 30, 4, 45, 2], [1, 17, 4, 33, 2]
    layout = KVLayout(12, 32, bits)
    run_and_compare(seq_lens, query_lens, 0, 6, 2, layout, torch.float32, index_dtype=torch.int64)


@pytest.mark.parametrize("bits", [0, 4])
def test_decode_only_long_context_splits(bits: int) -> None:
    # 4 splits of 32 tokens with a ragged last one; a 1-token context; MQA with 8 query heads
    layout = KVLayout(16, 64, bits)
    run_and_compare([100, 1, 64], [1, 1, 1], 3, 8, 1, layout, torch.float16)


@pytest.mark.parametrize(("bits", "window"), [(0, 1), (0, 7), (4, 5), (8, 40)])
def test_sliding_window(bits: int, window: int) -> None:
    # the window empties whole decode splits (40-token decode, window 5) and starts prefill tiles late
    layout = KVLayout(8, 32 if bits == 4 else 16, bits)
    run_and_compare([12, 40, 30, 30], [1, 1, 30, 7], 2, 4, 2, layout, torch.float32, window=window)


def test_default_config_multi_block_tiles() -> None:
    # default 64-key tiles span several 8-slot blocks; no split on one program per SM
    run_and_compare(SEQ_LENS, QUERY_LENS, 3, 4, 2, KVLayout(8, 64, 8), torch.float16, config=None)


def test_decode_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")  # one "SM": never splits unless asked
    assert decode_partition(4, 8, 4096, 64, cpu, None) == (4096, 1)
    assert decode_partition(1, 1, 4096, 64, cpu, 1000) == (1024, 4)  # whole 64-key tiles
    assert decode_partition(1, 1, 100, 16, cpu, 32) == (32, 4)
    monkeypatch.setattr(paged_attention, "_num_sms", lambda device: 132)  # an H100 / H200
    assert decode_partition(64, 8, 4096, 64, cpu, None) == (4096, 1)  # 512 programs fill it
    assert decode_partition(8, 8, 4096, 64, cpu, None) == (832, 5)  # 64 programs: 5 splits of 13 tiles
    assert decode_partition(1, 8, 4096, 64, cpu, None) == (256, 16)  # never under 256 tokens
    assert decode_partition(1, 8, 100, 64, cpu, None) == (128, 1)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128])
def test_store_quant_bit_exact(bits: int, dtype: torch.dtype, d: int) -> None:
    g = torch.Generator().manual_seed(d + bits)
    t, hkv, bs, nb = 21, 2, 8, 6
    k = (torch.randn(t, hkv, d, generator=g) * 3).to(dtype)
    v = (torch.randn(t, hkv, d, generator=g) + 100).to(dtype)  # large offset: zero dominates
    k[0] = 0.25  # a constant row: scale 0 (clamped to 1e-8 when quantizing)
    # exact ties: lo 0, hi 255/16 (15/16 for int4) makes scale 1/16 and (j + 0.5)/16 lands on j + 0.5
    qmax = (1 << bits) - 1
    tie = torch.arange(d) % qmax + 0.5
    tie[0], tie[1] = 0.0, float(qmax)
    k[1] = (tie / 16).to(dtype)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[3] = -1  # skipped by the kernel
    layout = KVLayout(bs, d, bits)
    want = torch.zeros(2, hkv, nb, block_bytes(bs, d, bits), dtype=torch.uint8)
    keep = slots >= 0
    store_kv_quant(k[keep], v[keep], want, slots[keep], bs, bits)
    got = torch.zeros_like(want, device=DEVICE)
    store_kv_triton(k.to(DEVICE), v.to(DEVICE), got, slots.to(DEVICE), layout)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_store_float_exact(cache_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    t, hkv, d, bs, nb = 13, 2, 32, 4, 5
    kv = torch.randn(2, t, 2 * hkv, d, generator=g)
    k, v = kv[0, :, ::2], kv[1, :, 1::2]  # strided heads: only the last dim must be contiguous
    slots = torch.randperm(nb * bs, generator=g)[:t]
    want = torch.zeros(2, hkv, nb, bs, d, dtype=cache_dtype)
    store_kv(k, v, want, slots, KVLayout(bs, d))
    got = torch.zeros_like(want, device=DEVICE)
    store_kv_triton(k.to(DEVICE), v.to(DEVICE), got, slots.to(DEVICE), KVLayout(bs, d))
    assert torch.equal(got.cpu(), want)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="checks the interpreter itself")
def test_interpreter_runs_on_cpu() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    from qserve.kernels import paged_attention_decode, paged_attention_prefill, paged_attention_store

    for kernel in (
        paged_attention_decode._decode_kernel,
        paged_attention_decode._reduce_kernel,
        paged_attention_prefill._prefill_kernel,
        paged_attention_store._store_kv_kernel,
    ):
        assert isinstance(kernel, InterpretedFunction)


def _args(layout: KVLayout, hq: int = 4, hkv: int = 2) -> dict[str, object]:
    q, cache, tables, qsl = build([5, 9], [1, 9], hq, hkv, layout, torch.float16)
    return dict(
        q=q,
        kv_cache=cache,
        block_tables=tables,
        seq_lens_tensor=torch.tensor([5, 9], device=DEVICE),
        query_start_loc_tensor=torch.tensor(qsl, device=DEVICE),
        num_decodes=1,
        scale=0.25,
        layout=layout,
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(layout=KVLayout(4, 48, 0)), "power of two"),
        (dict(layout=KVLayout(4, 8, 0)), "power of two"),
        (dict(layout=KVLayout(4, 16, 2)), "bits must be"),
        (dict(layout=KVLayout(4, 16, 4)), "int4 KV needs head_dim >= 32"),
        (dict(layout=KVLayout(8, 16, 0)), r"float KV cache must be \(2, Hkv, num_blocks, 8, 16\)"),
        (dict(layout=KVLayout(4, 16, 8)), "int8 KV cache must be uint8"),
        (dict(num_decodes=3), "num_decodes"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(seq_lens_tensor=torch.tensor([5, 9, 1])), "seq_lens_tensor"),
        (dict(query_start_loc_tensor=torch.tensor([0.0, 1.0, 10.0])), "query_start_loc_tensor"),
        (dict(block_tables=torch.zeros(2, 3, 1, dtype=torch.int32)), "block_tables must be"),
        (dict(out=torch.zeros(10, 4, 16)), "out must be"),
    ],
)
def test_attention_rejects_bad_inputs(change: dict[str, object], match: str) -> None:
    args = _args(KVLayout(4, 16, 0))
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        paged_attention_triton(**args)  # type: ignore[arg-type]


def test_supports_matches_the_checks() -> None:
    for d in (8, 16, 32, 48, 64, 128, 256, 512):
        for bits in (0, 2, 4, 8):
            layout = KVLayout(16, d, bits)
            ok = d in (16, 32, 64, 128, 256) and bits in (0, 4, 8) and not (bits == 4 and d < 32)
            assert supports(layout) == ok, layout


def test_attention_rejects_bad_heads_and_dtypes() -> None:
    args = _args(KVLayout(4, 16, 0), hq=4, hkv=2)
    q = args["q"]
    assert isinstance(q, torch.Tensor)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_attention_triton(**{**args, "q": q[:, :3]})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        paged_attention_triton(**{**args, "q": q.to(torch.int32)})  # type: ignore[arg-type]
    cache = args["kv_cache"]
    assert isinstance(cache, torch.Tensor)
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        paged_attention_triton(**{**args, "kv_cache": cache.to(torch.float64)})  # type: ignore[arg-type]


def test_store_rejects_bad_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = KVLayout(4, 32, 4)
    cache = make_cache(2, 3, layout, torch.float16)
    k = torch.zeros(5, 2, 32, device=DEVICE)
    slots = torch.arange(5, device=DEVICE)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        store_kv_triton(k, k[:4], cache, slots, layout)
    with pytest.raises(ValueError, match=r"k must be \(T, 2, 32\)"):
        store_kv_triton(k[:, :1], k[:, :1], cache, slots, layout)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv_triton(k, k, cache, slots[:4], layout)
    with pytest.raises(ValueError, match="rows must be"):
        store_kv_triton(k, k, cache[..., :-2], slots, layout)
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            store_kv_triton(k, k, cache, slots, layout)


# ------------------------------------------------------------------------------------------ compile check

# Run in a fresh interpreter: here the kernels were decorated in interpreter mode and cannot be compiled.
_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qserve.kernels import paged_attention_decode as dec, paged_attention_prefill as pre, paged_attention_store as st

def build(fn, pointers, constexprs):
    def kind(n):
        if n in constexprs: return "constexpr"
        if n.endswith("_ptr"): return pointers.get(n, "*i32")
        return "fp32" if n == "scale_log2e" else "i32"
    sig = {n: kind(n) for n in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["cubin"]

common = dict(HEAD_DIM=128, BLOCK_SIZE=16, BITS=4, BLOCK_N=64, DOT_PRECISION="tf32")
ptrs = {"q_ptr": "*bf16", "out_ptr": "*bf16", "cache_ptr": "*u8", "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32"}
build(dec._decode_kernel, ptrs, dict(common, GROUP=4, BLOCK_M=16, SPLIT=True, USE_WINDOW=True))
build(pre._prefill_kernel, ptrs, dict(common, GROUP=3, GROUP_PAD=4, BLOCK_Q=16, USE_WINDOW=False))
build(dec._reduce_kernel, ptrs, dict(HEAD_DIM=128))
st_ptrs = {"k_ptr": "*fp16", "v_ptr": "*fp16", "slot_ptr": "*i64", "cache_ptr": "*u8"}
build(st._store_kv_kernel, st_ptrs, dict(HEAD_DIM=128, BLOCK_SIZE=16, BITS=4, BLOCK_T=16))
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type == "cuda", reason="a GPU compiles them for real")
def test_kernels_compile_for_sm90() -> None:
    """The interpreter accepts code the compiler rejects: build the int4 paths (the most involved) to
    sm_90 machine code (H100/H200) with the ptxas that ships in triton's wheel."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


# ------------------------------------------------------------------------------------------ GPU, realistic sizes


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_llama3_layout(bits: int, dtype: torch.dtype) -> None:
    # Llama-3-8B heads: 32 query, 8 KV, head_dim 128; 16 decodes up to 3000 tokens, then chunked prefills
    g = torch.Generator().manual_seed(0)
    decodes = torch.randint(1, 3000, (16,), generator=g).tolist()
    seq_lens = decodes + [512, 1000, 77]
    query_lens = [1] * 16 + [512, 300, 77]
    run_and_compare(seq_lens, query_lens, 16, 32, 8, KVLayout(16, 128, bits), dtype, config=None)
    run_and_compare(seq_lens, query_lens, 16, 32, 8, KVLayout(16, 128, bits), dtype, window=256)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [0, 8, 4])
def test_gpu_store_exact(bits: int) -> None:
    t, hkv, d, bs = 4096, 8, 128, 16
    k = torch.randn(t, hkv, d, dtype=torch.bfloat16, device=DEVICE)
    v = torch.randn(t, hkv, d, dtype=torch.bfloat16, device=DEVICE)
    slots = torch.randperm(t + 512, device=DEVICE)[:t]
    layout = KVLayout(bs, d, bits)
    nb = (t + 512) // bs
    want = make_cache(hkv, nb, layout, torch.bfloat16).zero_()
    got = want.clone()
    store_kv(k, v, want, slots, layout)
    store_kv_triton(k, v, got, slots, layout)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("split", [None, 32])
def test_padded_decode_batch_as_a_cuda_graph_runs_it(bits: int, split: int | None) -> None:
    """A decode bucket as a captured graph launches it: every sequence row a decode (num_decodes = bucket),
    padding sequences of length 0, the context split sized by a fixed bound (max blocks x block size), and
    the padding tokens' slots -1. The real rows equal the unpadded reference; the cache is left as it was
    except at the real tokens' slots."""
    layout = KVLayout(16, 32, bits)
    real_lens, bucket = [5, 40, 17], 8
    q, cache, tables, _ = build(real_lens, [1, 1, 1], 4, 2, layout, torch.float32)
    scale = layout.head_dim**-0.5
    want = paged_attention_ref(q, cache, tables, real_lens, [0, 1, 2, 3], scale, layout)
    pad = bucket - len(real_lens)
    q_pad = torch.cat([q, torch.randn(pad, *q.shape[1:], device=DEVICE)])
    tables_pad = torch.cat([tables, torch.zeros(pad, tables.shape[1], dtype=tables.dtype, device=DEVICE)])
    lens = torch.tensor(real_lens + [0] * pad, dtype=torch.int32, device=DEVICE)
    qsl = torch.tensor([0, 1, 2, 3] + [3] * pad, dtype=torch.int32, device=DEVICE)
    before = cache.clone()
    k = torch.randn(bucket, 2, layout.head_dim, device=DEVICE)
    slots = torch.full((bucket,), -1, dtype=torch.int64, device=DEVICE)
    store_kv_triton(k, k, cache, slots, layout)  # padding rows only: nothing written
    assert torch.equal(cache.view(torch.uint8), before.view(torch.uint8))
    config = AttentionConfig(decode_block_n=16, prefill_block_m=16, prefill_block_n=16, partition_size=split)
    got = paged_attention_triton(
        q_pad, cache, tables_pad, lens, qsl, bucket, scale, layout,
        max_seq_len=tables.shape[1] * layout.block_size, config=config,
    )  # fmt: skip
    tol = TOL[torch.float32] * (50 if bits else 1)
    torch.testing.assert_close(got[: len(real_lens)], want, atol=tol, rtol=tol)
    if split is not None:  # the reduction writes zeros for a padding sequence, not unwritten partials
        assert torch.equal(got[len(real_lens) :], torch.zeros_like(got[len(real_lens) :]))
