# Sourced by bench/served_c1.sh and bench/served_c32.sh: wait for a set of servers, then drive each in turn
# with vLLM's own benchmark client, one summary line per server per round ($TOKENIZER: the model's tokenizer
# directory for the client, default the demo's).
#   servers=(name:port ...); ready_all; drive_rounds ROUNDS CLIENT_FLAGS...

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
