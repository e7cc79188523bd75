"""Writers of small AutoAWQ (GEMM) and GPTQ checkpoints, following their published layouts.

AutoAWQ GEMM: qweight int32 (K, N/8) and qzeros int32 (K/G, N/8) pack 8 output columns per int32 in the
order (0, 2, 4, 6, 1, 3, 5, 7); scales fp16 (K/G, N); W = (q - z) * s.
GPTQ (desc_act false): qweight int32 (K/8, N) packs 8 consecutive inputs per int32; qzeros int32
(K/G, N/8) packs 8 consecutive outputs and stores z - 1 ("gptq" v1) or z ("gptq_v2"); scales fp16
(K/G, N); g_idx int32 (K,) = k // G; W = (q - z) * s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qserve.kernels.packing import awq_pack, gptq_pack

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fake_quant(w: torch.Tensor, g: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> codes (K, N), zeros (K/G, N), fp16 scales (K/G, N), like the tools' own quantizers."""
    n, k = w.shape
    wg = w.float().reshape(n, k // g, g)
    if sym:
        s = (wg.abs().amax(-1) / 7.5).clamp(min=1e-6)
        z = torch.full_like(s, 8.0)
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)
        s = ((hi - lo) / 15).clamp(min=1e-6)
        z = torch.round(-lo / s).clamp(0, 15)
    s = s.half().float()
    q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, 15).reshape(n, k)
    return q.t().contiguous().to(torch.int64), z.t().contiguous().to(torch.int64), s.t().contiguous().half()


def published_dequant(
    q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, g: int, zero_offset: int = 0
) -> torch.Tensor:
    """Their reference dequant in fp16: codes (K, N), zeros (K/G, N), scales -> W (N, K)."""
    return ((q.half() - z.repeat_interleave(g, 0).half()) * s.repeat_interleave(g, 0)).t()


def write_quantized_checkpoint(
    src: Path, out: Path, kind: str, group_size: int, sym: bool = False, v2: bool = False
) -> dict[str, torch.Tensor]:
    """Quantize the float tiny model at ``src`` into an AutoAWQ ("awq") or GPTQ ("gptq") checkpoint.

    Returns {module: expected dequantized fp16 weight (N, K)} for bit-exactness checks.
    """
    out.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for name in f.keys():  # noqa: SIM118
            t = f.get_tensor(name)
            module, _, suffix = name.rpartition(".")
            if module.rpartition(".")[2] not in LINEARS or suffix != "weight":
                tensors[name] = t.half()
                continue
            q, z, s = _fake_quant(t, group_size, sym)
            expected[module] = published_dequant(q, z, s, group_size)
            if kind == "awq":
                tensors |= {
                    f"{module}.qweight": awq_pack(q),
                    f"{module}.qzeros": awq_pack(z),
                    f"{module}.scales": s,
                }
            else:
                qweight, qzeros = gptq_pack(q, z, zero_offset=0 if v2 else 1)
                g_idx = torch.arange(q.shape[0], dtype=torch.int32) // group_size
                tensors |= {
                    f"{module}.qweight": qweight,
                    f"{module}.qzeros": qzeros,
                    f"{module}.scales": s,
                    f"{module}.g_idx": g_idx,
                }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["torch_dtype"] = "float16"
    cfg.pop("dtype", None)
    if kind == "awq":
        cfg["quantization_config"] = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "version": "gemm",
            "zero_point": True,
        }
    else:
        cfg["quantization_config"] = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "desc_act": False,
            "sym": sym,
            "checkpoint_format": "gptq_v2" if v2 else "gptq",
        }
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, out / f.name)
    return expected
