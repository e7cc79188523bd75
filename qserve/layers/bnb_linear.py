"""Bnb4bitLinear: linear layers of bitsandbytes nf4 / fp4 checkpoints, computed by bitsandbytes itself.

A 4-bit bitsandbytes weight is a 16-entry codebook index per element (nf4: normal-float quantiles; fp4: a
tiny float format) with one float32 absmax per block of 64 elements (double quantization: those absmax
themselves 8-bit quantized in blocks of 256 with a float32 absmax each). No affine int4 layout represents it
exactly, so this layer keeps the checkpoint's packed weight and ``QuantState`` in bitsandbytes' own
``Linear4bit`` (what transformers runs them with). On CPU it runs bitsandbytes' CPU kernel (a bf16 AVX512
GEMM where the CPU has it, else dequantize + matmul); on CUDA qserve's Triton NF4 / FP4 dequant-matmul
(:mod:`qserve.kernels.bnb4_matmul`) on the same tensors, double quantization included. Fused projections
(q/k/v, gate/up) keep one Linear4bit per part and concatenate the outputs.

Checkpoint tensors of one projection ``P`` (as transformers saves a ``BitsAndBytesConfig(load_in_4bit)``
model): ``P.weight`` uint8 (ceil(N K / 2), 1), ``P.weight.absmax``, ``P.weight.quant_map`` (16,),
``P.weight.quant_state.bitsandbytes__nf4|fp4`` (the packed JSON of shape, dtype, blocksize), and with double
quantization ``P.weight.nested_absmax`` / ``P.weight.nested_quant_map``. LLM.int8 checkpoints (int8 weight +
``SCB``) run on CPU in :class:`Bnb8bitLinear` (bitsandbytes' ``Linear8bitLt``); on CUDA their weights, exact in
qserve's int8 layout, load as :class:`qserve.layers.quant_linear.QuantLinear` (weight-only W8A16).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from qserve.errors import QServeError
from qserve.kernels.bnb4_matmul import Bnb4Weight, bnb4_matmul
from qserve.kernels.packing import QuantSpec
from qserve.kernels.quant_matmul_configs import HAS_TRITON

# bitsandbytes' AVX512-bf16 CPU layout packs N in blocks of 32 (Qwen2-MoE's (1, H) gate does not fit)
_BNB_CPU_BLOCK_N = 32
BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state")


class Bnb4bitLinear(nn.Module):
    """``y = x @ dequant_bnb(W)^T + b`` for nf4 / fp4 weights; interface of :class:`qserve.layers.linear.Linear`."""

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
        self.has_bias = bias
        self.bias: torch.Tensor | None = None
        self.parts = nn.ModuleList()  # one bitsandbytes Linear4bit per sub-projection (q, k, v ...)
        self.kernel_weights: list[Bnb4Weight] | None = None  # set: forward runs qserve's Triton kernel
        self.compile_blocker: str | None = (
            None  # why the engine must not torch.compile this layer (read there)
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
            f"weights={self.spec.weights} (bitsandbytes), parts={len(self.parts)}"
        )

    def load(self, shards: list[dict[str, torch.Tensor]]) -> None:
        """One shard per sub-projection in output order; each holds ``weight`` and ``weight.<state>`` tensors."""
        from qserve.utils import import_bitsandbytes

        bnb = import_bitsandbytes()

        parts = nn.ModuleList()
        for shard in shards:
            w = shard.get("weight")
            if w is None:
                raise QServeError("bitsandbytes 4-bit layer without a weight tensor")
            if w.is_floating_point():  # a module the checkpoint left unquantized: quantize it the same way
                n = w.shape[0]
                lin = bnb.nn.Linear4bit(self.in_features, n, False, self.dtype, False, self.spec.weights)
                lin.weight = bnb.nn.Params4bit(w, False, quant_type=self.spec.weights, module=lin)
                lin = lin.to(self.device)  # quantizes (bitsandbytes quantizes on the move to a device)
            else:
                state = {k.removeprefix("weight."): v for k, v in shard.items() if k.startswith("weight.")}
                try:
                    qs = bnb.functional.QuantState.from_dict(dict(state), device=self.device)
                except (AssertionError, KeyError, ValueError) as e:
                    raise QServeError(f"bad bitsandbytes 4-bit quant state ({sorted(state)}): {e}") from None
                if (
                    qs.quant_type != self.spec.weights
                    or len(qs.shape) != 2
                    or qs.shape[1] != self.in_features
                ):
                    raise QServeError(
                        f"bitsandbytes weight is {qs.quant_type} {tuple(qs.shape)}, layer expects "
                        f"{self.spec.weights} (*, {self.in_features})"
                    )
                n = qs.shape[0]
                lin = bnb.nn.Linear4bit(
                    self.in_features, n, False, self.dtype, qs.nested, qs.quant_type, device="meta"
                )
                lin.weight = bnb.nn.Params4bit.from_prequantized(
                    w, state, requires_grad=False, device=self.device, module=lin
                )
            if lin.out_features % _BNB_CPU_BLOCK_N:  # bitsandbytes' packed CPU GEMM asserts N % 32 == 0
                lin.support_avx512bf16_for_cpu = False  # its generic path then: dequantize + matmul
            parts.append(lin)
        outs = sum(int(m.out_features) for m in self._linears(parts))
        if outs != self.out_features:
            raise QServeError(f"bitsandbytes weights have {outs} outputs, layer expects {self.out_features}")
        if self.has_bias:
            if any("bias" not in s for s in shards):
                raise QServeError("checkpoint lacks a bias the config asks for")
            self.bias = torch.cat([s["bias"] for s in shards]).to(self.device, self.dtype)
        self.parts = parts
        self.kernel_weights = None
        if self.device.type == "cuda" and HAS_TRITON and self.in_features % 2 == 0:  # (the kernel's limit)
            self.use_kernel()
        elif self.device.type == "cpu":
            self.compile_blocker = (
                "bitsandbytes' CPU 4-bit GEMM re-packs its weights during the first forward, which a compiled "
                "forward cannot follow (inductor's graph expects the packed shapes)"
            )

    def use_kernel(self) -> None:
        """Run forward through :func:`qserve.kernels.bnb4_matmul.bnb4_matmul` on bitsandbytes' own tensors.

        Done at load on CUDA; elsewhere the op is the pure-torch reference (or the Triton kernel in
        Triton's interpreter, which is how the tests reach it on CPU). On CPU it must come before the first
        forward: bitsandbytes re-packs the weights for its CPU GEMM then.
        """
        weights = []
        for lin in self._linears(self.parts):
            if getattr(lin.weight.quant_state, "packing_format_for_cpu", False):
                # bitsandbytes re-packed it for its CPU GEMM on a first forward; its inverse is not exact
                # (0.50.2, K = 128), so the original layout is gone
                raise RuntimeError("use_kernel() must come before the first forward on CPU")
            weights.append(Bnb4Weight.from_quant_state(lin.weight.data, lin.weight.quant_state))
        self.kernel_weights = weights
        self.compile_blocker = None

    @staticmethod
    def _linears(parts: nn.ModuleList) -> list[Any]:  # bitsandbytes' Linear4bit (untyped)
        return list(parts)

    @property
    def nbytes(self) -> int:
        """Packed codes plus absmax (and nested absmax) of every part."""
        n = 0
        for lin in self._linears(self.parts):
            qs = lin.weight.quant_state
            n += lin.weight.numel() * lin.weight.element_size() + qs.absmax.numel() * qs.absmax.element_size()
            if qs.state2 is not None:
                n += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x's dtype, by bitsandbytes' Linear4bit."""
        if len(self.parts) == 0:
            raise RuntimeError("Bnb4bitLinear used before load()")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (T, K)
        if self.kernel_weights is not None:
            ys = [bnb4_matmul(x2, w) for w in self.kernel_weights]  # (T, N_i) each
        else:
            ys = [lin(x2) for lin in self.parts]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class Bnb8bitLinear(nn.Module):
    """LLM.int8 layers of a bitsandbytes ``load_in_8bit`` checkpoint on CPU, computed by bitsandbytes'
    own ``Linear8bitLt`` (int8 activations, fp16 outlier columns above ``llm_int8_threshold``), so the result
    is what transformers + bitsandbytes compute. Interface of :class:`qserve.layers.linear.Linear`.

    Checkpoint tensors of one projection ``P``: ``P.weight`` int8 (N, K) and ``P.SCB`` float32 (N,) (row
    absmax: ``W = weight * SCB / 127``). A float ``P.weight`` (a module the checkpoint skipped) stays float, as
    transformers keeps it. Fused projections keep one part per sub-projection and concatenate the outputs.
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
        self.has_bias = bias
        self.threshold = float(spec.extra.get("llm_int8_threshold", 6.0))
        self.parts = nn.ModuleList()  # bitsandbytes Linear8bitLt, or a float nn.Linear for a skipped module
        self.compile_blocker: str | None = (
            "bitsandbytes' LLM.int8 matmul picks its outlier columns from each input's values at run time"
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
            f"weights=int8 (bitsandbytes LLM.int8, threshold {self.threshold}), parts={len(self.parts)}"
        )

    def load(self, shards: list[dict[str, torch.Tensor]]) -> None:
        """One shard per sub-projection in output order: ``weight`` int8 + ``SCB``, or a float ``weight``."""
        from qserve.utils import import_bitsandbytes

        bnb = import_bitsandbytes()
        _quiet_int8_cast_notice()
        parts = nn.ModuleList()
        for shard in shards:
            w, bias = shard.get("weight"), shard.get("bias")
            if w is None or w.dim() != 2 or w.shape[1] != self.in_features:
                raise QServeError(f"bitsandbytes int8 layer expects a (N, {self.in_features}) weight")
            if self.has_bias and bias is None:
                raise QServeError("checkpoint lacks a bias the config asks for")
            n = w.shape[0]
            if w.is_floating_point():
                dense = nn.Linear(self.in_features, n, self.has_bias, device=self.device, dtype=self.dtype)
                dense.weight.data.copy_(w)
                lin: nn.Module = dense
            else:
                scb = shard.get("SCB")
                if w.dtype != torch.int8 or scb is None or tuple(scb.shape) != (n,):
                    raise QServeError(
                        f"not a bitsandbytes LLM.int8 layout (int8 weight (N, K) + SCB (N,)): "
                        f"{w.dtype} {tuple(w.shape)}, SCB {None if scb is None else tuple(scb.shape)}"
                    )
                lin = bnb.nn.Linear8bitLt(
                    self.in_features, n, self.has_bias, has_fp16_weights=False, threshold=self.threshold,
                    device="meta",
                )  # fmt: skip
                lin.weight = bnb.nn.Int8Params(
                    w.contiguous(), requires_grad=False, has_fp16_weights=False, SCB=scb.float()
                ).to(self.device)
            if self.has_bias:
                assert bias is not None
                lin.bias = nn.Parameter(bias.to(self.device, self.dtype), requires_grad=False)
            parts.append(lin.eval())
        outs = sum(int(getattr(m, "out_features", 0)) for m in parts)
        if outs != self.out_features:
            raise QServeError(f"bitsandbytes weights have {outs} outputs, layer expects {self.out_features}")
        self.parts = parts

    @property
    def nbytes(self) -> int:
        """int8 codes plus SCB (and any float part) of every part."""
        return sum(t.numel() * t.element_size() for m in self.parts for t in (*m.parameters(), *_scb(m)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x's dtype, by bitsandbytes' Linear8bitLt."""
        if len(self.parts) == 0:
            raise RuntimeError("Bnb8bitLinear used before load()")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (T, K)
        ys = [part(x2).to(x.dtype) for part in self.parts]  # (T, N_i) each
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        return y.reshape(*shape[:-1], self.out_features)


def _scb(m: nn.Module) -> list[torch.Tensor]:
    """A Linear8bitLt's SCB: on its weight until the first forward, which moves it to ``m.state``."""
    scb = getattr(getattr(m, "weight", None), "SCB", None)
    if scb is None:
        scb = getattr(getattr(m, "state", None), "SCB", None)
    return [scb] if isinstance(scb, torch.Tensor) else []


def _drop_cast_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_notice() -> None:
    """bitsandbytes logs, on EVERY LLM.int8 matmul with float32 / bf16 inputs, that it casts them to fp16 to
    quantize them (which is how LLM.int8 works): one filter on that logger drops just that line."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if _drop_cast_notice not in log.filters:
        log.addFilter(_drop_cast_notice)
