"""The one bit-packing module: qserve's quantized weight layout, and re-packing from AutoAWQ / GPTQ.

The converter writes it, QuantLinear loads it, kernels read it. Layout (docs/FORMAT.md), for a linear
layer W (N=out_features, K=in_features) and group size G:

* int4 (W4A16, asymmetric, group-wise): ``W[n, k] ~= (q[n, k] - z[n, k // G]) * s[n, k // G]``
  - ``qweight`` uint8 (N, K // 2): two 4-bit codes per byte along K; k even in the low nibble.
  - ``scales``  float (N, K // G): fp16 / bf16 / fp32, the checkpoint's float dtype (fp16 for imports).
  - ``qzeros``  uint8 (N, K // G): integer zero points, unpacked (0..15; GPTQ v1 imports may hold 16).
* int8 (W8A16, symmetric, per output channel): ``W[n, k] ~= q[n, k] * s[n]``
  - ``qweight`` int8 (N, K), codes in [-127, 127];  ``scales`` float (N,).

Every tensor keeps dim 0 = out_features, so fused projections (q/k/v) concatenate along dim 0.
A leaf module: imports only torch. Errors are ValueError (qserve.errors.QServeError subclasses it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

FORMAT_VERSION = 1
WEIGHT_KINDS = ("int4", "int8")
BNB_4BIT = ("nf4", "fp4")  # bitsandbytes' 4-bit codebooks (weights of a "bnb" QuantSpec, besides int8)
GROUP_SIZES = (32, 64, 128)  # what `qserve convert` offers; imports also accept 256 (torch's CPU kernel does)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: nibble i of an int32 holds output column AWQ_ORDER[i]


@dataclass
class QuantizedWeight:
    """A quantized (out_features, in_features) matrix in qserve's layout (see module docstring).

    ``group_size`` is -1 for int8 (one scale per output channel); ``zeros`` is None exactly for int8.
    """

    qweight: Tensor  # int4: uint8 (N, K // 2); int8: int8 (N, K)
    scales: Tensor  # int4: (N, K // G); int8: (N,)
    zeros: Tensor | None  # int4: uint8 (N, K // G); int8: None
    weights: str  # "int4" | "int8"
    group_size: int
    in_features: int
    out_features: int

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight (N, K) this stands for, in ``dtype`` (default: the scales' dtype).

        Computed in float32 and rounded once, so it is bit-exact with AutoAWQ / GPTQ's fp16 dequant.
        """
        dtype = dtype or self.scales.dtype
        if self.weights == "int8":
            return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)  # (N, K)
        assert self.zeros is not None
        n, k, g = self.out_features, self.in_features, self.group_size
        q = unpack_int4(self.qweight).float().view(n, k // g, g)  # (N, K/G, G)
        w = (q - self.zeros.float()[..., None]) * self.scales.float()[..., None]  # (N, K/G, G)
        return w.view(n, k).to(dtype)

    def tensors(self) -> dict[str, Tensor]:
        """Checkpoint tensors by name suffix: qweight, scales (+ qzeros for int4)."""
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            out["qzeros"] = self.zeros
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], weights: str, group_size: int) -> QuantizedWeight:
        """Inverse of :meth:`tensors`, checking dtypes and shapes against the layout."""
        qweight, scales = t["qweight"], t["scales"]
        n = qweight.shape[0]
        if weights == "int8":
            if qweight.dtype != torch.int8 or scales.shape != (n,):
                raise ValueError(f"int8 layout expects int8 qweight (N, K) and scales (N,), got {_desc(t)}")
            return cls(qweight, scales, None, "int8", -1, qweight.shape[1], n)
        k = qweight.shape[1] * 2
        zeros = t.get("qzeros")
        ok = qweight.dtype == torch.uint8 and zeros is not None and zeros.dtype == torch.uint8
        if not ok or group_size <= 0 or k % group_size or scales.shape != (n, k // group_size):
            raise ValueError(f"int4 g{group_size} layout expects uint8 qweight/qzeros, got {_desc(t)}")
        assert zeros is not None
        if zeros.shape != scales.shape:
            raise ValueError(f"int4 g{group_size} layout expects uint8 qweight/qzeros, got {_desc(t)}")
        return cls(qweight, scales, zeros, "int4", group_size, k, n)

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Concatenate along the output dimension (fused q/k/v or gate/up projections)."""
        if len(parts) == 1:
            return parts[0]
        p0 = parts[0]
        if any(
            (p.weights, p.group_size, p.in_features) != (p0.weights, p0.group_size, p0.in_features)
            for p in parts
        ):
            raise ValueError("cannot fuse projections quantized with different settings")
        zeros = None if p0.zeros is None else torch.cat([p.zeros for p in parts if p.zeros is not None])
        return QuantizedWeight(
            torch.cat([p.qweight for p in parts]),
            torch.cat([p.scales for p in parts]),
            zeros,
            p0.weights,
            p0.group_size,
            p0.in_features,
            sum(p.out_features for p in parts),
        )


def _desc(t: dict[str, Tensor]) -> str:
    return ", ".join(f"{k} {str(v.dtype).removeprefix('torch.')}{tuple(v.shape)}" for k, v in t.items())


# ----------------------------------------------------------------------------- int4 nibbles (ours)


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) integer codes in [0, 15] -> uint8 (N, K // 2); k even in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even in_features, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)  # (N, K/2)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 (N, K // 2) -> uint8 (N, K) codes in [0, 15]."""
    lo, hi = packed & 0x0F, packed >> 4  # (N, K/2) each
    return torch.stack([lo, hi], dim=-1).flatten(-2)  # (N, K)


# ----------------------------------------------------------------------------- round-to-nearest


def _storage_scale(s: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float32 scales to the storage dtype, never downwards, so codes stay within their range."""
    tiny = torch.finfo(dtype).smallest_normal
    out = s.clamp(min=tiny).to(dtype)
    low = out.float() < s
    if bool(low.any()):
        out = torch.where(low, torch.nextafter(out, torch.full_like(out, float("inf"))), out)
    return out


def quantize(
    w: Tensor, weights: str = "int4", group_size: int = 128, scale_dtype: torch.dtype | None = None
) -> QuantizedWeight:
    """Round-to-nearest quantization of a float (N, K) weight. Error per element <= scale / 2.

    int4: asymmetric per group of ``group_size`` inputs, the range widened to include 0 so that zero
    points are integers in [0, 15]. int8: symmetric per output channel, codes in [-127, 127].
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(
            f"expected a float (out_features, in_features) weight, got {w.dtype} {tuple(w.shape)}"
        )
    n, k = w.shape
    scale_dtype = scale_dtype or w.dtype
    wf = w.float()
    if weights == "int8":
        s = _storage_scale(wf.abs().amax(dim=1) / 127.0, scale_dtype)  # (N,)
        q = (wf / s.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)  # (N, K)
        return QuantizedWeight(q, s, None, "int8", -1, k, n)
    if weights != "int4":
        raise ValueError(f"unknown weight format {weights!r}: use int4 or int8")
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group size {group_size} does not divide in_features {k}")
    wg = wf.view(n, k // group_size, group_size)  # (N, K/G, G)
    lo = wg.amin(dim=-1).clamp(max=0.0)  # (N, K/G)
    hi = wg.amax(dim=-1).clamp(min=0.0)
    s = _storage_scale((hi - lo) / 15.0, scale_dtype)  # (N, K/G)
    sf = s.float()
    z = torch.round(-lo / sf).clamp_(0, 15)  # (N, K/G)
    q = (wg / sf[..., None]).round_().add_(z[..., None]).clamp_(0, 15).to(torch.uint8)  # (N, K/G, G)
    return QuantizedWeight(pack_int4(q.view(n, k)), s, z.to(torch.uint8), "int4", group_size, k, n)


# ----------------------------------------------------------------------------- AutoAWQ (GEMM) and GPTQ


def _unpack_int32(x: Tensor, dim: int) -> Tensor:
    """Split each int32 into 8 nibbles (nibble i = bits 4i..4i+3), expanding ``dim`` 8x, as uint8."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=x.device)  # (8,)
    nib = (x.unsqueeze(-1) >> shifts) & 0xF  # (..., 8)
    if dim == 0:
        nib = nib.transpose(1, 2)  # (R, 8, C)
    return nib.reshape(x.shape[0] * 8, x.shape[1]) if dim == 0 else nib.reshape(x.shape[0], x.shape[1] * 8)


def _pack_int32(q: Tensor, dim: int) -> Tensor:
    """Inverse of :func:`_unpack_int32`: 8 codes along ``dim`` -> one int32 (code i at bits 4i)."""
    q = q.to(torch.int64)
    if dim == 0:
        q = q.reshape(q.shape[0] // 8, 8, q.shape[1]).transpose(1, 2)  # (R, C, 8)
    else:
        q = q.reshape(q.shape[0], q.shape[1] // 8, 8)  # (R, C, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    packed = (q << shifts).sum(dim=-1)  # (R, C) in [0, 2^32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


_AWQ_PERM = torch.tensor(AWQ_ORDER)
_AWQ_INV = torch.argsort(_AWQ_PERM)


def _awq_unpack(x: Tensor) -> Tensor:
    """AutoAWQ int32 (R, N // 8) -> uint8 (R, N) in natural output order."""
    nib = _unpack_int32(x, dim=1).view(x.shape[0], -1, 8)  # (R, N/8, 8) in AWQ order
    return nib[..., _AWQ_INV.to(x.device)].reshape(x.shape[0], -1).to(torch.uint8)  # (R, N)


def awq_pack(q: Tensor) -> Tensor:
    """(R, N) codes in natural output order -> AutoAWQ GEMM int32 (R, N // 8). Used to write test fixtures."""
    r = q.shape[0]
    q = q.view(r, -1, 8)[..., _AWQ_PERM.to(q.device)].reshape(r, -1)  # nibble i <- column AWQ_ORDER[i]
    return _pack_int32(q, dim=1)


def repack_awq(t: dict[str, Tensor], group_size: int) -> QuantizedWeight:
    """AutoAWQ GEMM tensors (qweight int32 (K, N/8), qzeros int32 (K/G, N/8), scales (K/G, N)) -> ours."""
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if qweight.dtype != torch.int32 or scales.shape != (k // group_size, n) or k % group_size:
        raise ValueError(f"not an AutoAWQ GEMM layout with group size {group_size}: {_desc(t)}")
    q = _awq_unpack(qweight).t()  # (N, K)
    z = _awq_unpack(qzeros).t().contiguous()  # (N, K/G)
    return QuantizedWeight(pack_int4(q), scales.t().contiguous(), z, "int4", group_size, k, n)


def repack_gptq(t: dict[str, Tensor], group_size: int, zero_offset: int = 1) -> QuantizedWeight:
    """GPTQ tensors (qweight int32 (K/8, N), qzeros int32 (K/G, N/8), scales (K/G, N)) -> ours.

    ``zero_offset`` is 1 for the original ("gptq", v1) format, which stores zero - 1, and 0 for gptq_v2.
    ``g_idx`` must be the trivial k // G (desc_act false); act-order checkpoints are refused.
    """
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if qweight.dtype != torch.int32 or k % group_size or scales.shape != (k // group_size, n):
        raise ValueError(f"not a 4-bit GPTQ layout with group size {group_size}: {_desc(t)}")
    g_idx = t.get("g_idx")
    if g_idx is not None and not torch.equal(g_idx.long().cpu(), torch.arange(k) // group_size):
        raise ValueError("GPTQ checkpoint uses act-order (desc_act=true), which qserve does not support")
    q = _unpack_int32(qweight, dim=0).t().to(torch.uint8)  # (N, K)
    z = (_unpack_int32(qzeros, dim=1) + zero_offset).t().to(torch.uint8).contiguous()  # (N, K/G)
    return QuantizedWeight(pack_int4(q), scales.t().contiguous(), z, "int4", group_size, k, n)


def repack_bnb_int8(t: dict[str, Tensor]) -> QuantizedWeight:
    """bitsandbytes LLM.int8 tensors (weight int8 (N, K), SCB float32 (N,): W = q * SCB / 127) -> ours.

    Our int8 layout is the same codes with ``scales = SCB / 127`` (float32); the dequantized weight differs from
    bitsandbytes' ``q * SCB * (1/127)`` by at most one float32 rounding. 4-bit (nf4 / fp4) weights have no
    int4 equivalent (a 16-entry non-uniform codebook): :class:`qserve.layers.bnb_linear.Bnb4bitLinear` keeps them.
    """
    w, scb = t.get("weight"), t.get("SCB")
    if w is None or scb is None or w.dtype != torch.int8 or w.dim() != 2 or scb.shape != (w.shape[0],):
        raise ValueError(f"not a bitsandbytes LLM.int8 layout (int8 weight (N, K) + SCB (N,)): {_desc(t)}")
    return QuantizedWeight(w, scb.float() / 127.0, None, "int8", -1, w.shape[1], w.shape[0])


def gptq_pack(q: Tensor, zeros: Tensor, zero_offset: int = 1) -> tuple[Tensor, Tensor]:
    """Codes (K, N) and zero points (K/G, N) -> GPTQ qweight (K/8, N), qzeros (K/G, N/8). For fixtures."""
    return _pack_int32(q, dim=0), _pack_int32((zeros.to(torch.int64) - zero_offset) & 0xF, dim=1)


# ----------------------------------------------------------------------------- quantization_config


@dataclass(frozen=True)
class QuantSpec:
    """A checkpoint's quantization_config, parsed: what the loader and QuantLinear need to know."""

    source: str  # "qserve" | "awq" | "gptq" | "bnb": the on-disk layout of the linear tensors
    weights: str  # "int4" | "int8" | "nf4" | "fp4" (the last two: bitsandbytes 4-bit only)
    group_size: int  # -1 for int8 (per output channel)
    sym: bool = False  # symmetric codes (int8; GPTQ sym); informational for int4
    method: str = "rtn"  # how it was made: rtn | awq | gptq
    zero_offset: int = 0  # GPTQ v1 stores zero - 1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_config(cls, d: dict[str, Any] | None) -> QuantSpec | None:
        """Parse ``config.json["quantization_config"]``; None for an unquantized checkpoint.

        Raises:
            ValueError: a method, format or setting qserve does not read (one line saying which).
        """
        if not d:
            return None
        if not isinstance(d, dict):
            raise ValueError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        try:
            return cls._parse(d)
        except (KeyError, TypeError) as e:
            raise ValueError(f"invalid quantization_config {d}: missing or malformed {e}") from None

    @classmethod
    def _parse(cls, d: dict[str, Any]) -> QuantSpec:
        kind = str(d.get("quant_method", "")).lower()
        if kind == "qserve":
            if int(d.get("format_version", 0)) != FORMAT_VERSION:
                raise ValueError(f"qserve format_version {d.get('format_version')} is not {FORMAT_VERSION}")
            weights = d.get("weights")
            if weights not in WEIGHT_KINDS:
                raise ValueError(f"qserve checkpoint has unknown weights {weights!r}")
            group = -1 if weights == "int8" else int(d["group_size"])
            return cls("qserve", weights, group, weights == "int8", str(d.get("method", "rtn")), 0, dict(d))
        if kind in ("awq", "gptq"):
            bits, group = (
                int(d.get("bits", d.get("w_bit", 4))),
                int(d.get("group_size", d.get("q_group_size", 128))),
            )
            if bits != 4:
                raise ValueError(f"{kind} checkpoints with {bits}-bit weights are not supported (4-bit only)")
            if group not in (*GROUP_SIZES, 256):
                raise ValueError(f"{kind} group size {group} is not supported (32, 64, 128 or 256)")
            if kind == "awq":
                version = str(d.get("version", "gemm")).lower()
                if version != "gemm" or d.get("zero_point") is False:
                    raise ValueError(f"AWQ version {version!r} is not supported (GEMM with zero points only)")
                return cls("awq", "int4", group, False, "awq", 0, dict(d))
            if d.get("desc_act"):
                raise ValueError("GPTQ desc_act=true (act-order) checkpoints are not supported")
            fmt = str(d.get("checkpoint_format", "gptq")).lower()
            if fmt not in ("gptq", "gptq_v2"):
                raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
            return cls("gptq", "int4", group, bool(d.get("sym", True)), "gptq", int(fmt == "gptq"), dict(d))
        if kind == "bitsandbytes":
            return cls._parse_bnb(d)
        raise ValueError(
            f"unsupported quantization method {kind or d!r}: qserve reads qserve, awq, gptq and bitsandbytes"
        )

    @classmethod
    def _parse_bnb(cls, d: dict[str, Any]) -> QuantSpec:
        """transformers' BitsAndBytesConfig: load_in_4bit (nf4 / fp4, double quant or not) or load_in_8bit."""
        if d.get("load_in_4bit"):
            qtype = str(d.get("bnb_4bit_quant_type", "fp4")).lower()
            if qtype not in BNB_4BIT:
                raise ValueError(f"bitsandbytes 4-bit quant type {qtype!r} is not supported (nf4 or fp4)")
            storage = str(d.get("bnb_4bit_quant_storage", "uint8")).lower()
            if storage != "uint8":
                raise ValueError(f"bitsandbytes bnb_4bit_quant_storage {storage!r} is not supported (uint8)")
            return cls("bnb", qtype, -1, False, "bnb", 0, dict(d))
        if d.get("load_in_8bit"):
            return cls("bnb", "int8", -1, True, "bnb", 0, dict(d))
        raise ValueError("bitsandbytes quantization_config sets neither load_in_4bit nor load_in_8bit")

    def to_qserve(self, tensors: dict[str, Tensor]) -> QuantizedWeight:
        """One (unfused) projection's checkpoint tensors, in this spec's source layout -> ours."""
        if self.source == "awq":
            return repack_awq(tensors, self.group_size)
        if self.source == "gptq":
            return repack_gptq(tensors, self.group_size, self.zero_offset)
        if self.source == "bnb":
            return repack_bnb_int8(tensors)
        return QuantizedWeight.from_tensors(tensors, self.weights, self.group_size)
