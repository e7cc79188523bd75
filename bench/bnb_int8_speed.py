"""LLM.int8 demo checkpoint on CPU: qserve's Bnb8bitLinear (bitsandbytes' Linear8bitLt, the default) vs the
W8A16 re-pack (QuantLinear, what CUDA runs), offline output tok/s, A B A B in one process.

    flock /tmp/qserve-bench.lock .venv/bin/python bench/bnb_int8_speed.py [OUT_DIR]
"""

import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import qserve.layers.linear as L
import qserve.models.llama as ML
import qserve.models.moe as MM
from qserve import LLM, SamplingParams
from qserve.demo import MODEL_DIR
from qserve.layers.quant_linear import QuantLinear

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qserve-demo-int8")
if not out.exists():
    cfg = BitsAndBytesConfig(load_in_8bit=True)
    m = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), quantization_config=cfg, dtype=torch.bfloat16)
    m.save_pretrained(str(out))
    for f in MODEL_DIR.glob("tok*"):
        shutil.copy(f, out)
real = L.make_linear


def w8a16(i, o, b, q, d, dev):
    if q is not None and q.source == "bnb" and q.weights == "int8":
        return QuantLinear(i, o, b, q, d, dev)
    return real(i, o, b, q, d, dev)


engines = {"bnb Linear8bitLt": LLM(str(out), kv_cache_memory=1 << 26)}
L.make_linear = w8a16
ML.make_linear = MM.make_linear = w8a16
engines["W8A16 re-pack"] = LLM(str(out), kv_cache_memory=1 << 26)
ids = [[(7 * i + j) % 4000 + 10 for j in range(64)] for i in range(8)]
sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
for name, llm in engines.items():
    print(name, type(llm.engine.model.model.layers[0].self_attn.qkv_proj).__name__)
    llm.generate(prompt_token_ids=ids[:1], sampling_params=SamplingParams(max_tokens=2))
for r in range(2):
    for name, llm in engines.items():
        for b in (8, 1):
            t = time.perf_counter()
            llm.generate(prompt_token_ids=ids[:b], sampling_params=sp)
            print(
                f"round {r} {name} batch {b}: {b * 32 / (time.perf_counter() - t):.1f} output tok/s",
                flush=True,
            )
