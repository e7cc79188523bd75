"""QuantLinear: the runtime linear layer for int4 / int8 weights (qserve, AutoAWQ or GPTQ checkpoints).

``y = x @ dequant(W)^T + b``. Checkpoint tensors are re-packed ONCE in :meth:`QuantLinear.load`:

* CPU int4 where qserve's native kernels run (`cpu_native`, AVX512-BF16): ``qserve_cpu::linear_w4`` on
  16-column int4 panels (backend "cpu-native-int4"): dot products on the codes at decode batch sizes, a
  dequantized bf16 tile per 64 columns above 8 rows; 2-3x torch's int4 kernel at every M, and faster than
  the native bf16 linear at batch 1 (bench/RESULTS.md). It also takes group sizes torch's kernel rejects.
  int8 likewise (``qserve_cpu::linear_w8``, "cpu-native-int8"): 1.1-3x torch's int8 kernel.
* CPU otherwise: torch's own weight-only kernels, ``aten._weight_int4pack_mm_for_cpu`` (int4: codes re-packed by
  ``aten._convert_weight_to_int4pack_for_cpu``, scales and zeros rewritten as ``(K/G, N, 2)`` pairs with
  ``W = (q - 8) * scale + zero``) and ``aten._weight_int8pack_mm``. In torch 2.13 only their bfloat16 paths
  are fast (fp32/fp16 run 5-10x slower than a dense matmul), so they compute in bfloat16 whatever the
  model dtype, and the output is cast back.
* CUDA: ``qserve.kernels.quant_matmul`` (Triton) on qserve's own layout, kept as loaded.
* Other devices, and group sizes the CPU kernel rejects: the reference path, which dequantizes with
  :meth:`QuantizedWeight.dequantize` on every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qserve.errors import QServeError
from qserve.kernels import cpu_native
from qserve.kernels.packing import QuantizedWeight, QuantSpec, quantize, unpack_int4

_CPU_DTYPE = torch.bfloat16  # the one dtype torch's CPU weight-only kernels are fast in
_CPU_INT4_GROUPS = (32, 64, 128, 256)
_CPU_INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N % 16 == 0: we pad rows
_INNER_K_TILES = 2


def native_ok(qw: QuantizedWeight) -> bool:
    """Whether qserve's native CPU kernel for this weight's kind takes its shape (and runs on this machine):
    int8 needs an even K; int4 a K and group size that are multiples of 4, K of G."""
    k, g = qw.in_features, qw.group_size
    shape_ok = k % 2 == 0 if qw.weights == "int8" else k % 4 == 0 and g % 4 == 0 and k % g == 0
    return shape_ok and cpu_native.available()


def cpu_int4_ok(group_size: int) -> bool:
    """Whether torch's CPU int4 kernel takes this group size."""
    return group_size in _CPU_INT4_GROUPS


def pack_cpu_int4(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """qserve int4 -> torch's CPU int4 form: (packed codes (N', K/2), scales_and_zeros bf16 (K/G, N', 2)).

    N' is N padded to a multiple of 16 with rows of code 8 and scale 0 (they compute zeros; slice them off).
    """
    assert qw.zeros is not None
    pad = -qw.out_features % _CPU_INT4_N_MULTIPLE
    codes = unpack_int4(qw.qweight).to(torch.int32)  # (N, K)
    scales, zeros = qw.scales.float(), qw.zeros.float()  # (N, K/G)
    if pad:  # extra rows of code 8, scale 0: they compute zeros and are sliced off
        codes = torch.cat([codes, codes.new_full((pad, codes.shape[1]), 8)])
        scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])
        zeros = torch.cat([zeros, zeros.new_full((pad, zeros.shape[1]), 8.0)])
    # (q - z) * s == (q - 8) * s + (8 - z) * s: torch's kernel wants the second form.
    sz = torch.stack([scales, (8.0 - zeros) * scales], dim=-1)  # (N', K/G, 2)
    scales_and_zeros = sz.transpose(0, 1).to(_CPU_DTYPE).contiguous()  # (K/G, N', 2), a new tensor
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INNER_K_TILES)  # (N', K/2)
    return packed, scales_and_zeros


class QuantLinear(nn.Module):
    """Weight-only quantized linear layer; interface of :class:`qserve.layers.linear.Linear`.

    Args:
        in_features, out_features: the (possibly fused) layer's shape.
        bias: whether the checkpoint carries a bias (kept in ``dtype``).
        spec: the checkpoint's parsed quantization_config (source layout, int4/int8, group size).
        dtype: the model's activation dtype; inputs and outputs use it.
        device: where the weights live.

    Invariants: after :meth:`load`, ``backend`` is "cpu-native-int4", "cpu-native-int8", "cpu-int4", "cpu-int8",
    "triton" or "reference", and only the tensors that backend reads are kept (the CPU kernels' packed forms
    are not decodable back).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        spec: QuantSpec,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.dtype, self.device = spec, dtype, torch.device(device)
        self.backend = "unloaded"
        self.qweight: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.qzeros: torch.Tensor | None = None
        self.scales_and_zeros: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.has_bias = bias
        self._qw: QuantizedWeight | None = None

    def extra_repr(self) -> str:
        g = f", group_size={self.spec.group_size}" if self.spec.weights == "int4" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
            f"weights={self.spec.weights}{g}, source={self.spec.source}, backend={self.backend}"
        )

    # ------------------------------------------------------------------------------------------ load

    def load(self, shards: list[dict[str, torch.Tensor]]) -> None:
        """Fill from checkpoint tensors of the sub-projections in output order (e.g. [q, k, v]).

        Each shard holds the spec's source layout (qweight/scales/qzeros[/g_idx]); a shard with a float
        ``weight`` instead (a layer the checkpoint left unquantized) is quantized here by round-to-nearest.
        """
        try:
            parts = [self._to_qserve(s) for s in shards]
            qw = QuantizedWeight.cat(parts)
        except (KeyError, ValueError) as e:
            raise QServeError(
                f"bad quantized weights ({self.spec.source}, {self.spec.weights}): {e}"
            ) from None
        if (qw.out_features, qw.in_features) != (self.out_features, self.in_features):
            raise QServeError(
                f"quantized weight is {qw.out_features}x{qw.in_features}, layer expects "
                f"{self.out_features}x{self.in_features}"
            )
        if self.has_bias:
            if any("bias" not in s for s in shards):
                raise QServeError("checkpoint lacks a bias the config asks for")
            self.bias = torch.cat([s["bias"] for s in shards]).to(self.device, self.dtype)  # (N,)
        self.set_weight(qw)

    def _to_qserve(self, shard: dict[str, torch.Tensor]) -> QuantizedWeight:
        if "qweight" not in shard and "weight" in shard and shard["weight"].is_floating_point():
            w = shard["weight"]
            return quantize(w, self.spec.weights, self.spec.group_size, scale_dtype=w.dtype)
        return self.spec.to_qserve(shard)

    def set_weight(self, qw: QuantizedWeight) -> None:
        """Install a QuantizedWeight, re-packing it for the backend this device and shape allow."""
        self.qweight = self.scales = self.qzeros = self.scales_and_zeros = self._qw = None
        native = self.device.type == "cpu" and native_ok(qw)
        if native and qw.weights == "int8":
            self.backend = "cpu-native-int8"
            self.qweight, self.scales = cpu_native.pack_w8(qw.qweight, qw.scales)  # (P, K/2, 16, 2), (P, 16)
        elif self.device.type == "cpu" and qw.weights == "int8":
            self.backend = "cpu-int8"
            # Own, freshly allocated copies: tensors straight from a safetensors file can sit at any byte
            # offset, and torch's CPU kernels crash on unaligned weights.
            self.qweight = qw.qweight.clone(memory_format=torch.contiguous_format)  # int8 (N, K)
            self.scales = qw.scales.to(_CPU_DTYPE).clone()  # (N,)
        elif native:  # int4
            self.backend = "cpu-native-int4"
            assert qw.zeros is not None
            # codes (P, K/4, 16, 2) uint8, scales (P, K/G, 16) fp32, zeros (P, K/G, 16) uint8
            self.qweight, self.scales, self.qzeros = cpu_native.pack_w4(
                unpack_int4(qw.qweight), qw.scales, qw.zeros, qw.group_size
            )
        elif self.device.type == "cpu" and qw.group_size in _CPU_INT4_GROUPS:
            self.backend = "cpu-int4"
            self._pack_cpu_int4(qw)
        else:
            self.backend = "triton" if self.device.type == "cuda" else "reference"
            self._qw = QuantizedWeight(
                qw.qweight.to(self.device),
                qw.scales.to(self.device),
                None if qw.zeros is None else qw.zeros.to(self.device),
                qw.weights,
                qw.group_size,
                qw.in_features,
                qw.out_features,
            )
            self.qweight, self.scales, self.qzeros = self._qw.qweight, self._qw.scales, self._qw.zeros

    def _pack_cpu_int4(self, qw: QuantizedWeight) -> None:
        self.qweight, self.scales_and_zeros = pack_cpu_int4(qw)
        self._n_padded = self.qweight.shape[0]

    # --------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x's dtype."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (T, K)
        if self.backend == "cpu-native-int4":
            w4 = (self.qweight, self.scales, self.qzeros)
            y = cpu_native.linear_w4(x2.to(_CPU_DTYPE), w4, None, self.out_features, self.spec.group_size)  # type: ignore[arg-type]
            y = y.to(x.dtype)  # (T, N)
        elif self.backend == "cpu-int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.to(_CPU_DTYPE), self.qweight, self.spec.group_size, self.scales_and_zeros
            )  # (T, N')
            y = y[:, : self.out_features].to(x.dtype)
        elif self.backend == "cpu-native-int8":
            w8 = (self.qweight, self.scales)
            y = cpu_native.linear_w8(x2.to(_CPU_DTYPE), w8, None, self.out_features).to(x.dtype)  # type: ignore[arg-type]
        elif self.backend == "cpu-int8":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(_CPU_DTYPE), self.qweight, self.scales).to(x.dtype)
        elif self.backend == "triton":  # the W4A16 / W8A16 kernels (reference fallback without triton)
            from qserve.kernels.quant_matmul import quant_matmul

            assert self._qw is not None
            y = quant_matmul(x2, self._qw)  # (T, N)
        elif self.backend == "reference":
            assert self._qw is not None
            y = F.linear(x2, self._qw.dequantize(x.dtype))  # (T, N)
        else:
            raise RuntimeError("QuantLinear used before load()")
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)
