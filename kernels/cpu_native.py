"""qserve's native CPU kernels (``cpu_gemm.cpp``, ``cpu_gemm_w4.cpp``, ``cpu_gemm_w8.cpp``, ``cpu_attention.cpp``):
built once per machine with the C++ compiler inductor already needs, loaded as the torch ops
``torch.ops.qserve_cpu.*``.

* ``qserve_cpu::pack_bf16(w)``: a (N, K) bf16 weight -> the kernel's 16-column panels, (ceil(N/16), K/2, 16, 2).
* ``qserve_cpu::linear_bf16(x, packed, bias, out_features)``: x (..., K) @ W^T + b, bf16 in and out, fp32
  accumulation. On AVX512-BF16 CPUs it is 1.8-3.8x faster than oneDNN's prepacked bf16 linear at M = 1 and
  level with it at M = 512 (bench/RESULTS.md), so it replaces oneDNN's layout rather than adding one.
* ``qserve_cpu::linear_w4(x, codes, scales, zeros, bias, out_features, group_size)``: the same for int4 weights
  packed by `pack_w4` (dot products on the codes up to 8 rows, a dequantized bf16 tile per 64 columns above).
* ``qserve_cpu::linear_w8(x, codes, scales, bias, out_features)``: the same for int8 weights with one scale
  per output column, packed by `pack_w8`.
* ``qserve_cpu::decode_attention(q, k, v, kv_cache, slot_mapping, block_tables, seq_lens, ...)``: the compiled
  decode step's attention (store the new K/V, then attend, one query per sequence) for float and int8/int4
  caches; `decode_attention` below. ``QSERVE_NATIVE_ATTENTION=0`` keeps inductor's fusion of the torch ops.

`available()` is False (and the callers keep oneDNN) when the CPU lacks AVX512-BF16, no compiler is found,
the build fails, or ``QSERVE_NATIVE=0``. The build (~45 s on 2 cores) goes to ``~/.cache/qserve/native/<hash>/``, keyed by
the source, torch's version and the compiler, written under a temporary name and renamed into place, so
processes that build at once never load a half-written library.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("qserve")
# Every native source is compiled into one library (one build, one load); the ops register themselves.
SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("cpu_gemm.cpp", "cpu_gemm_w4.cpp", "cpu_gemm_w8.cpp", "cpu_attention.cpp")
)
HEADERS = tuple(Path(__file__).with_name(name) for name in ("cpu_panels.h",))
CACHE_DIR = Path(os.environ.get("QSERVE_NATIVE_CACHE", Path.home() / ".cache" / "qserve" / "native"))
ISA_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-mf16c"]


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU runs ``vdpbf16ps`` (Linux: /proc/cpuinfo's flags)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return "avx512_bf16" in line.split()
    except OSError:
        pass
    return False


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _build(cxx: str) -> Path:
    """Compile the `SOURCES` into the cache (if not there yet) and return the library's path."""
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    flags += ISA_FLAGS
    key = hashlib.sha256(
        b"".join(src.read_bytes() for src in (*SOURCES, *HEADERS))
        + f"{torch.__version__}|{cxx}|{' '.join(flags)}".encode()
    ).hexdigest()[:16]
    out = CACHE_DIR / key / "qserve_cpu.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *flags, *includes, *map(str, SOURCES), "-o", tmp, *libs, "-lc10", "-ltorch", "-ltorch_cpu"]
    logger.info("building qserve's native CPU kernels (once per machine, ~45 s on 2 cores)")
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def available() -> bool:
    """Build (once) and load the native kernels; False, with one warning, where they cannot run here."""
    if os.environ.get("QSERVE_NATIVE", "1") == "0" or sys.platform != "linux" or not cpu_has_avx512_bf16():
        return False
    cxx = _compiler()
    if cxx is None:
        logger.warning("no C++ compiler found: bf16 linears use oneDNN (slower at small batches)")
        return False
    try:
        torch.ops.load_library(str(_build(cxx)))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = (
            e.stderr.strip().splitlines()[-1:] if isinstance(e, subprocess.CalledProcessError) else [str(e)]
        )
        logger.warning("qserve's native CPU kernels did not build (%s): bf16 linears use oneDNN", detail)
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (the ops are opaque kernels to inductor); once per process, as
    `available` is cached."""

    @torch.library.register_fake("qserve_cpu::linear_bf16")
    def _(
        x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
    ) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("qserve_cpu::linear_w4")
    def _(
        x: torch.Tensor,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None,
        out_features: int,
        group_size: int,
    ) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("qserve_cpu::linear_w8")
    def _(
        x: torch.Tensor,
        codes: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        out_features: int,
    ) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("qserve_cpu::dequant_w4")
    def _(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
        return codes.new_empty(codes.shape[0], codes.shape[1] * 2, 16, 2, dtype=torch.bfloat16)

    @torch.library.register_fake("qserve_cpu::decode_attention")
    def _(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        block_size: int,
        head_dim: int,
        bits: int,
        sliding_window: int,
    ) -> torch.Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("qserve_cpu::pack_bf16")
    def _(w: torch.Tensor) -> torch.Tensor:
        panels = (w.shape[0] + 15) // 16
        return w.new_empty(panels, w.shape[1] // 2, 16, 2)


def pack_bf16(w: torch.Tensor) -> torch.Tensor:
    """(N, K) bf16 -> the panel layout `linear_bf16` reads (rows past N are zero)."""
    return torch.ops.qserve_cpu.pack_bf16(w)


def linear_bf16(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) -> (..., out_features), bf16; W packed by `pack_bf16`."""
    return torch.ops.qserve_cpu.linear_bf16(x, packed, bias, out_features)


def set_min_thread_work(work: int) -> int:
    """Set how many multiply-adds a panel linear call (bf16, int4, int8) needs before it uses a second thread;
    returns the previous value. Outputs do not depend on it (each tile is summed the same way on any thread);
    the default (2**18) is what batch-1 decode on 2 cores wanted. For A/B benchmarks in one process."""
    return int(torch.ops.qserve_cpu.set_min_thread_work(work))


def pack_w4(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 codes (N, K) in [0, 15] with per-group scales and zero points (N, K/G), W = (q - z) * s -> the
    layout `linear_w4` reads: codes (P, K/4, 16, 2) uint8, scales (P, K/G, 16) fp32, zeros (P, K/G, 16) uint8,
    P = ceil(N/16).

    Byte [p, t, j, e] holds column 16p + j's codes at k = 4t + e (low nibble) and 4t + 2 + e (high nibble).
    Columns past N get code 0, scale 0 and zero 0, so they compute 0. K and G must be multiples of 4, K of G.
    """
    n, k = codes.shape
    if k % 4 or group_size % 4 or k % group_size:
        raise ValueError(f"int4 panels need K ({k}) and the group size ({group_size}) multiples of 4, K of G")
    if scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(
            f"scales/zeros {tuple(scales.shape)}/{tuple(zeros.shape)} do not match ({n}, {k // group_size})"
        )
    pad = -n % 16
    p = (n + pad) // 16
    q = F.pad(codes.to(torch.uint8), (0, 0, 0, pad)).view(p, 16, k // 4, 2, 2)  # (p, j, t, h, e): k = 4t+2h+e
    packed = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).permute(0, 2, 1, 3).contiguous()  # (P, K/4, 16, 2)

    def panels(t: torch.Tensor) -> torch.Tensor:  # (N, K/G) -> (P, K/G, 16)
        return F.pad(t, (0, 0, 0, pad)).view(p, 16, -1).transpose(1, 2).contiguous()

    return packed, panels(scales.float()), panels(zeros.to(torch.uint8))


def linear_w4(
    x: torch.Tensor,
    w4: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bias: torch.Tensor | None,
    out_features: int,
    group_size: int,
) -> torch.Tensor:
    """x (..., K) bf16 @ dequant(W)^T (+ bias) -> (..., out_features) bf16; ``w4`` = `pack_w4`'s tensors."""
    return torch.ops.qserve_cpu.linear_w4(x, *w4, bias, out_features, group_size)


def pack_w8(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight (N, K) with one scale per output column (N,) -> the layout `linear_w8` reads: codes
    (P, K/2, 16, 2) uint8 holding q + 128 in the bf16 panel order, scales (P, 16) fp32, P = ceil(N/16).
    Columns past N get code 128 (q = 0) and scale 0. K must be even."""
    n, k = qweight.shape
    if k % 2:
        raise ValueError(f"int8 panels need an even in_features, got {k}")
    if scales.shape != (n,):
        raise ValueError(f"scales {tuple(scales.shape)} do not match ({n},)")
    pad = -n % 16
    u = (qweight.to(torch.int16) + 128).to(torch.uint8)  # (N, K) in [0, 255]
    u = F.pad(u, (0, 0, 0, pad), value=128)
    codes = u.view(-1, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()  # (P, K/2, 16, 2)
    return codes, F.pad(scales.float(), (0, pad)).view(-1, 16).contiguous()


def linear_w8(
    x: torch.Tensor, w8: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """x (..., K) bf16 @ (s * Q)^T (+ bias) -> (..., out_features) bf16; ``w8`` = `pack_w8`'s tensors."""
    return torch.ops.qserve_cpu.linear_w8(x, *w8, bias, out_features)


def attention_available() -> bool:
    """Whether the compiled decode step attends through `decode_attention` (``QSERVE_NATIVE_ATTENTION=0``: no)."""
    return os.environ.get("QSERVE_NATIVE_ATTENTION", "1") != "0" and available()


def decode_attention(
    q: torch.Tensor,  # (B, Hq, D), RoPE applied
    k: torch.Tensor,  # (B, Hkv, D): this step's keys, one token per sequence
    v: torch.Tensor,  # (B, Hkv, D)
    kv_cache: torch.Tensor,  # one layer's cache (kernels.attention / kernels.kv_quant layout), written in place
    slot_mapping: torch.Tensor,  # (B,) int64, -1 on padding rows
    block_tables: torch.Tensor,  # (B, nblk) int32
    seq_lens: torch.Tensor,  # (B,) int32, 0 for padding sequences
    scale: float,
    block_size: int,
    head_dim: int,
    bits: int,
    sliding_window: int = 0,  # 0: none
) -> torch.Tensor:
    """`store_kv_graph` then `decode_attention_graph` in one native call: (B, Hq, D) in q's dtype."""
    return torch.ops.qserve_cpu.decode_attention(
        q,
        k,
        v,
        kv_cache,
        slot_mapping,
        block_tables,
        seq_lens,
        scale,
        block_size,
        head_dim,
        bits,
        sliding_window,
    )
