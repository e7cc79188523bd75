#!/usr/bin/env bash
# One-shot GPU check for a lent machine: set up, run the GPU tests, benchmark the kernels and end-to-end
# decode, then write one JSON summary.
#
#   bash bench/gpu.sh                      # whole run, ends within GPU_SH_BUDGET_S (default 470 s)
#   GPU_SH_SECTIONS="setup kernels_bench" bash bench/gpu.sh     # a subset, in this order
#   GPU_SH_ALLOW_CPU=1 PYTHON=.venv/bin/python bash bench/gpu.sh # no GPU: every section on CPU (--dry-run)
#
# Results: $OUT if set (the device tool brings that folder back), else bench/out/gpu. Files there:
# gpu.log (everything printed), kernels.json + kernels.csv (bench/kernel_timings.py), attention.json +
# attention.md (bench/attention.py), decode.json (bench/decode.py), summary.json (bench/gpu_summary.py:
# sections, environment, every goal, the decode table). Keep the total under the device tool's 8 files.
#
# Each section has a time cap (GPU_SH_CAP_<SECTION> seconds; defaults below sum to the 470 s budget):
# gpu_tests 90, kernels_bench 130, attention_bench 60, decode_bench 170. CPU plumbing mode: 150, 150, 120,
# 160 within GPU_SH_BUDGET_S 600, the benchmarks' timing loops cut to a third of their cap (tiny shapes in
# Triton's interpreter are slow; the point there is that every section runs and writes its JSON).
#
# Adding a section (e.g. paged-attention timings): write a function `section_<name>` that runs its
# commands through `run_step <limit-seconds> <command...>` and writes into "$RESULTS", then add <name>
# to SECTIONS below. Each step's limit is cut to the time left, so the whole run always ends in budget.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
if [[ ${GPU_SH_ALLOW_CPU:-0} == 1 ]]; then BUDGET=${GPU_SH_BUDGET_S:-600}; else BUDGET=${GPU_SH_BUDGET_S:-470}; fi
RESULTS=${OUT:-$ROOT/bench/out/gpu}
# shellcheck disable=SC2206  # word splitting intended
SECTIONS=(${GPU_SH_SECTIONS:-setup gpu_tests kernels_bench attention_bench decode_bench})
HAS_CUDA='import os, sys, torch; sys.exit(0 if torch.cuda.is_available() or os.environ.get("GPU_SH_ALLOW_CPU") == "1" else 1)'
BENCH_ARGS=()
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/gpu.log") 2>&1
export PYTHONUNBUFFERED=1
STATUS=()
RECORDS=()  # name:rc:seconds per section, for the JSON summary
FAILED=0
PY=""
SHIMS=()
trap 'rm -f "${SHIMS[@]}"' EXIT

left() { echo $((BUDGET - SECONDS)); }

# cap NAME GPU CPU: a section's time cap in seconds (GPU_SH_CAP_<NAME>, else GPU's or, plumbing, CPU's).
cap() {
    local var="GPU_SH_CAP_${1^^}"
    if [[ -n ${!var:-} ]]; then echo "${!var}"; elif [[ ${GPU_SH_ALLOW_CPU:-0} == 1 ]]; then echo "$3"; else echo "$2"; fi
}
# share LIMIT: the part of a section's limit its benchmark may spend timing (the rest: setup, correctness)
share() { if [[ ${GPU_SH_ALLOW_CPU:-0} == 1 ]]; then echo $(($1 / 3)); else echo $(($1 * 2 / 3)); fi; }

# run_step LIMIT CMD...: run CMD under `timeout`, the limit cut to the time left (minus a margin).
run_step() {
    local limit=$1
    shift
    local avail=$(($(left) - 10))
    ((avail < limit)) && limit=$avail
    if ((limit < 15)); then
        echo "!! skipped (out of time): $*"
        return 124
    fi
    echo "-- [$((SECONDS))s, limit ${limit}s] $*"
    timeout -k 10 "$limit" "$@"
}

# ------------------------------------------------------------------------------------------- setup

pick_python() {
    # A python whose torch sees the GPU: $PYTHON, the machine's python3 (the lent image has CUDA torch),
    # the project venv.
    local cand
    for cand in ${PYTHON:-} python3 "$ROOT/.venv/bin/python" python; do
        command -v "$cand" >/dev/null 2>&1 || continue
        if timeout 120 "$cand" -c "$HAS_CUDA" 2>/dev/null; then
            PY=$(command -v "$cand")
            return 0
        fi
    done
    # None: a fresh venv with torch from PyPI (needs network; a lent machine has none, but has CUDA torch).
    echo "no python with CUDA torch found: creating /tmp/qserve-gpu-venv (torch from PyPI)"
    python3 -m venv /tmp/qserve-gpu-venv &&
        run_step 300 /tmp/qserve-gpu-venv/bin/pip install -q torch triton pytest numpy &&
        PY=/tmp/qserve-gpu-venv/bin/python &&
        "$PY" -c "$HAS_CUDA"
}

ensure_qserve() {
    # qserve.kernels maps to kernels/ through the install's package-dir: install it editable, offline, or
    # fall back to symlinks qserve/{kernels,converters,models} -> ../* (removed on exit).
    local probe='import qserve.kernels.quant_matmul, qserve.kernels.packing'
    "$PY" -c "$probe" 2>/dev/null && return 0
    echo "qserve not importable: pip install -e . (no deps, no build isolation)"
    if [[ $PY == /tmp/qserve-gpu-venv/* ]]; then
        run_step 240 "$PY" -m pip install -q -e "$ROOT" && "$PY" -c "$probe" && return 0
    else
        run_step 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e "$ROOT" && "$PY" -c "$probe" && return 0
    fi
    echo "editable install failed: symlinking the package folders into qserve/"
    local pkg
    for pkg in kernels converters models; do
        if [[ ! -e qserve/$pkg ]]; then
            ln -s "../$pkg" "qserve/$pkg" && SHIMS+=("qserve/$pkg")
        fi
    done
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
    "$PY" -c "$probe"
}

section_setup() {
    pick_python || { echo "no python with CUDA torch"; return 1; }
    echo "python: $PY"
    ensure_qserve || { echo "cannot import qserve"; return 1; }
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "no GPU (GPU_SH_ALLOW_CPU=1): the benchmark runs --dry-run"
        BENCH_ARGS=(--dry-run)
        return 0
    fi
    "$PY" - <<'EOF'
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"gpu: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
EOF
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
    fi
    return 0
}

# ------------------------------------------------------------------------------------------- tests

section_gpu_tests() {
    # Every test marked `gpu` in the project; kernels compile on first use, so this takes a while.
    run_step "$(cap gpu_tests 90 150)" "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors --durations=10 tests/
}

# ------------------------------------------------------------------------------------------- benchmarks

section_kernels_bench() {
    # W4A16 / W8A16 vs fp16 on Llama-3-8B shapes; prints the table last, writes kernels.json / kernels.csv.
    local limit=$(($(left) - 20)) most
    most=$(cap kernels_bench 130 150)
    ((limit > most)) && limit=$most
    run_step "$limit" env TRITON_PRINT_AUTOTUNING=1 "$PY" bench/kernel_timings.py --out "$RESULTS" \
        --budget-s "$(share "$limit")" "${BENCH_ARGS[@]}"
}

# ------------------------------------------------------------------------------------------- attention (issue 6)
# Paged decode attention, B=64 x L=4096, Llama-3-8B heads: fp16 / int8 / int4 KV in the Triton kernels vs
# torch SDPA; correctness first, then timings, then a launch-config sweep cut to the time left. Writes
# attention.json + attention.md. Needs ~2-3 min; with the other sections it does not fit one 470 s run:
#   GPU_SH_SECTIONS="setup attention_bench" bash bench/gpu.sh

section_attention_bench() {
    local limit=$(($(left) - 20)) most
    most=$(cap attention_bench 60 120)
    ((limit > most)) && limit=$most
    run_step "$limit" "$PY" bench/attention.py --out "$RESULTS" --budget-s "$(share "$limit")" "${BENCH_ARGS[@]}"
}

# ------------------------------------------------------------------------------------------- decode (issue 17)
# End-to-end decode tok/s through qserve.LLM on a random model of Llama-3-8B's shape: weights bf16/int8/int4
# x KV bf16/int8/int4 x batch 1/16/64 x eager/graphs, device busy (CUDA events, torch profiler), fraction
# of the HBM roofline. The goals' points run first; the budget skips the rest (listed in decode.json).

section_decode_bench() {
    local limit=$(($(left) - 15)) most
    most=$(cap decode_bench 170 160)
    ((limit > most)) && limit=$most
    run_step "$limit" "$PY" bench/decode.py --out "$RESULTS" --budget-s $((limit * 3 / 4)) "${BENCH_ARGS[@]}"
}

# ------------------------------------------------------------------------------------------- main

echo "== bench/gpu.sh: sections ${SECTIONS[*]}, budget ${BUDGET}s, results in $RESULTS"
for name in "${SECTIONS[@]}"; do
    if [[ -z $PY && $name != setup ]]; then
        STATUS+=("$name: skipped (setup failed)")
        RECORDS+=("$name:skipped:0")
        FAILED=1
        continue
    fi
    echo
    echo "== $name [$((SECONDS))s]"
    t0=$SECONDS
    "section_$name"
    rc=$?
    STATUS+=("$name: rc=$rc ($((SECONDS - t0))s)")
    RECORDS+=("$name:$rc:$((SECONDS - t0))")
    ((rc != 0)) && FAILED=1
    [[ $name == setup && $rc != 0 ]] && PY=""
done
echo
echo "== summary [$((SECONDS))s of ${BUDGET}s]"
printf '   %s\n' "${STATUS[@]}"
"${PY:-python3}" bench/gpu_summary.py "$RESULTS" "${RECORDS[@]}" || FAILED=1
exit $FAILED
