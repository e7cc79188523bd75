#!/usr/bin/env bash
# Issue 21's served comparison at concurrency 1: qserve (bf16, int4 and int8 weights, int8 and int4 KV) and
# llama.cpp's llama-server (BF16, Q4_0) on the demo model, all up at once and driven in turn by vLLM's own
# benchmark client, A B C ... per round, so every ratio is read within one round on the same machine state.
#
#   bench/served_c1.sh [ROUNDS]                # default 3; prints one line per server per round
#
# Needs: .venv (make install), vLLM's venv ($VLLM_PY, ../shared/peers/vllm-cpu.sh), llama.cpp's build and the
# demo's GGUFs ($LLAMA_DIR, ../shared/peers/llama-cpp.sh DIR qserve/demo/model), and the int4/int8 conversions
# ($INT4, $INT8: `qserve convert demo DIR --weights int4|int8`). Run it on a quiet machine: with anything
# else on the 2 cores every server's TPOT moves by 2-3x.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
INT4=${INT4:-/tmp/demo-int4}
INT8=${INT8:-/tmp/demo-int8}
log=${LOG_DIR:-/tmp/served_c1}
source bench/served_lib.sh
serve_qserve qserve-bf16 8061 demo
serve_qserve qserve-int4 8062 "$INT4"
serve_qserve qserve-int8 8063 "$INT8"
serve_qserve qserve-bf16-kv8 8064 demo --kv-cache-dtype int8
serve_qserve qserve-bf16-kv4 8065 demo --kv-cache-dtype int4
serve_llama llama-bf16 8066 "$LLAMA_DIR/gguf/demo-bf16.gguf" -np 1 -c 4096
serve_llama llama-q4_0 8067 "$LLAMA_DIR/gguf/demo-q4_0.gguf" -np 1 -c 4096
ready_all
drive_rounds "$rounds" --random-input-len 128 --random-output-len 128 --num-prompts 16 --max-concurrency 1
