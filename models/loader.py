"""Load a Hugging Face directory (single or sharded safetensors) into our model classes."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from qserve.config import ModelConfig
from qserve.errors import QServeError
from qserve.models.llama import FUSED_PROJECTIONS
from qserve.models.moe import CHECKPOINT_RENAMES
from qserve.models.registry import get_model_class

# bitsandbytes 4-bit quant state tensors: P.weight.<state> belongs to module P, suffix "weight.<state>"
_BNB_STATE = re.compile(
    r"^(?P<module>.+)\.(?P<suffix>weight\.(?:absmax|quant_map|nested_absmax|nested_quant_map"
    r"|quant_state\.bitsandbytes__(?:nf4|fp4)))$"
)
_IGNORED = ("rotary_emb.inv_freq", ".weight_format")  # recomputed buffers; bitsandbytes int8 metadata
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in shard order, validated to exist (loader and converter)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise QServeError(f"{index} is not a valid safetensors index: {e}") from None
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise QServeError(
            f"no safetensors weights in {path} (model.safetensors or model-*.safetensors expected)"
        )
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise QServeError(f"missing safetensors shard {missing[0]} in {path}")
    return files


def _quant_spec(cfg: ModelConfig):  # type: ignore[no-untyped-def]
    if not cfg.quantization:
        return None
    from qserve.kernels.packing import QuantSpec

    try:
        return QuantSpec.from_config(cfg.quantization)
    except ValueError as e:  # an unsupported or malformed quantization_config
        raise QServeError(f"unsupported quantization_config: {e}") from None


def load_model(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Build the model for ``cfg`` and fill it from the checkpoint at ``path``.

    Linear layers (possibly fused: q/k/v -> qkv_proj, gate/up -> gate_up_proj) receive their checkpoint
    tensors through ``load(shards)``, so quantized formats are handled by the layer that owns them; the
    experts of an MoE layer (``....experts``) receive all of theirs, by relative name, through ``load_named``.
    """
    model = get_model_class(cfg.architecture)(cfg, dtype, device, quant=_quant_spec(cfg))
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    # fused module name -> shard index -> {suffix: tensor}
    pending: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    named: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # experts module -> relative name -> tensor
    seen: set[str] = set()
    for file in checkpoint_files(path):
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise QServeError(f"cannot read {file}: {e}") from None
        with handle as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if name.endswith(_IGNORED):
                    continue
                tensor = f.get_tensor(name)
                name = _rename(name)
                owner, sep, rel = name.partition(".experts.")
                if sep and hasattr(modules.get(f"{owner}.experts"), "load_named"):
                    named[f"{owner}.experts"][rel] = tensor
                    continue
                bnb = _BNB_STATE.match(name)
                module_name, _, suffix = (bnb["module"], ".", bnb["suffix"]) if bnb else name.rpartition(".")
                parent, _, leaf = module_name.rpartition(".")
                if leaf in FUSED_PROJECTIONS:
                    fused, shard = FUSED_PROJECTIONS[leaf]
                    pending[f"{parent}.{fused}"][shard][suffix] = tensor
                elif hasattr(modules.get(module_name), "load"):
                    pending[module_name][0][suffix] = tensor
                elif name in params:
                    _copy(params[name], tensor, name)
                    seen.add(name)
                else:
                    raise QServeError(f"unexpected tensor {name!r} in {file.name} for {cfg.architecture}")
    for module_name, shards in pending.items():
        module = modules.get(module_name)
        if module is None:
            raise QServeError(f"checkpoint has weights for unknown module {module_name!r}")
        module.load([shards[i] for i in sorted(shards)])  # type: ignore[operator]
        seen.update(f"{module_name}.{n}" for n, _ in module.named_parameters())
    for module_name, mod in modules.items():
        if hasattr(mod, "load_named"):
            if module_name not in named:
                raise QServeError(f"checkpoint is missing the expert weights of {module_name}")
            mod.load_named(named.pop(module_name))  # type: ignore[operator]
    # lm_head may be tied to the embedding (then it is the same Parameter and was filled already).
    missing = [n for n in params if n not in seen and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]
    if "lm_head.weight" in missing and "model.embed_tokens.weight" in seen:
        model.lm_head.weight = model.model.embed_tokens.weight  # type: ignore[union-attr]
        missing.remove("lm_head.weight")
    if missing:
        raise QServeError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[0]}")
    return model.eval()


def _rename(name: str) -> str:
    for old, new in CHECKPOINT_RENAMES:
        name = name.replace(old, new)
    return name


def _copy(param: torch.nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if param.shape != tensor.shape:
        raise QServeError(
            f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(param.shape)}"
        )
    param.data.copy_(tensor)
