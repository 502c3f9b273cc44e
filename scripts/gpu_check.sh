#!/usr/bin/env bash
# The GPU check: everything a CUDA machine can tell us about sslam_fast, budgeted for under 8 minutes on one H100
# (the stage budgets below add up to 470 s; the typical run is shorter).
#
#   setup        scripts/setup_env.sh
#   tests        the `cuda`-marked tests (pytest -m cuda; tests/conftest.py skips them without a GPU)
#   bench_ops    benchmarks/bench_ops.py --device cuda          every op at the real SSLAM shapes, bf16
#   bench_fbank  benchmarks/bench_fbank.py --device cuda        eat_features backends, 96 x 10 s clips
#   bench_masks  benchmarks/bench_masks.py --device cuda        inverse_block_mask backends, 12 x 16 clones
#   bench_train  benchmarks/bench_train.py --device cuda --preset base --write   the whole step, bf16, eager and
#                compiled (SSLAM stage 2 by default: GPU_CHECK_TRAIN_ARGS="--stage both" adds EAT stage 1)
#
# Each benchmark writes its GPU section of benchmarks/RESULTS.md (bench_ops_cuda, bench_fbank_cuda, bench_masks_cuda,
# bench_train_base_cuda) with its ratio chart (benchmarks/charts/<section>.png); the CPU sections are never touched. Every stage runs under `timeout` with its own budget and
# logs to $LOG_DIR/<stage>.log; all stages run even when one fails, then a summary names the ones that failed. The
# folder also gets env.log (nvidia-smi, torch), summary.txt and a copy of RESULTS.md.
#
# Exit codes:
#   0   every stage passed
#   1   at least one stage failed or ran out of its budget (see the summary and the logs)
#   77  no usable CUDA device. Checked before the set-up wherever possible, so that a machine without a GPU stops
#       at once, having run and written nothing: CUDA_VISIBLE_DEVICES empty or negative; else `nvidia-smi -L`; where
#       that lists no GPU, torch in .venv; where there is no .venv either, a /dev/nvidia<N> device node decides
#       whether the set-up runs, and torch is asked after it.
#
# Environment:
#   GPU_CHECK_LOG_DIR                  the log folder (default runs/gpu_check-<YYYYmmdd-HHMMSS>)
#   GPU_CHECK_BUDGET_<STAGE>           seconds for a stage, STAGE one of SETUP TESTS BENCH_OPS BENCH_FBANK BENCH_MASKS
#                                      BENCH_TRAIN (defaults 90 90 100 20 20 150: 470 s in all)
#   GPU_CHECK_TRAIN_ARGS               more bench_train.py arguments (default "--stage sslam"; set and empty: none,
#                                      i.e. both stages)
set -euo pipefail

readonly NO_CUDA=77

# Nothing but bash builtins, nvidia-smi and .venv's python until the CUDA check has passed: the no-GPU exit must not
# depend on other tools on PATH, nor cost more than one torch import.
here=${BASH_SOURCE[0]%/*}
if [[ $here == "${BASH_SOURCE[0]}" ]]; then here=.; fi  # started as `gpu_check.sh` from scripts/
cd "$here/.."
PY=.venv/bin/python

no_cuda() {
    echo "gpu_check: no usable CUDA device ($1); exiting with code $NO_CUDA" >&2
    exit "$NO_CUDA"
}

torch_sees_cuda() {
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
}

# --- 1. is there a GPU? (before the set-up, which takes minutes on a fresh machine) ----------------------------------
if [[ ${CUDA_VISIBLE_DEVICES+set} == set && ( -z $CUDA_VISIBLE_DEVICES || $CUDA_VISIBLE_DEVICES == -* ) ]]; then
    no_cuda "CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' hides every GPU"
fi
smi_gpus=""
if command -v nvidia-smi >/dev/null 2>&1; then
    smi_gpus=$(nvidia-smi -L 2>/dev/null) || smi_gpus=""
fi
torch_checked=0
if [[ $smi_gpus != *"GPU "[0-9]* ]]; then
    # nvidia-smi is absent (some containers) or lists nothing: ask torch if it is installed, else the device nodes
    if [[ -x $PY ]]; then
        torch_sees_cuda || no_cuda "no GPU from nvidia-smi, and torch.cuda.is_available() is False"
        torch_checked=1
    else
        shopt -s nullglob
        nodes=(/dev/nvidia[0-9]*)
        shopt -u nullglob
        ((${#nodes[@]} > 0)) || no_cuda "no nvidia-smi GPU, no /dev/nvidia<N> device, and no .venv to ask torch"
    fi
fi

# --- 2. the stages ---------------------------------------------------------------------------------------------------
# The Triton interpreter (tests/conftest.py sets it on CPU machines) would be timed instead of the kernels.
unset TRITON_INTERPRET
LOG_DIR=${GPU_CHECK_LOG_DIR:-runs/gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$LOG_DIR"
start=$SECONDS
passed=()
failed=()

run_stage() {  # run_stage NAME DEFAULT_BUDGET_S COMMAND...; GPU_CHECK_BUDGET_<NAME> replaces the default
    local name=$1 budget_var="GPU_CHECK_BUDGET_${1^^}"
    local budget=${!budget_var:-$2}
    shift 2
    local log="$LOG_DIR/$name.log" t0=$SECONDS rc=0 why
    echo "[$name] $* (budget ${budget} s, log $log)"
    # timeout runs the command in its own process group and signals the whole group, so the subprocesses of pytest
    # and bench_train go too; --kill-after covers a process that ignores SIGTERM.
    timeout --kill-after=15 "$budget" "$@" >"$log" 2>&1 || rc=$?
    local dt=$((SECONDS - t0))
    if [[ $rc == 0 ]]; then
        echo "[$name] ok in ${dt} s"
        tail -n 3 "$log" | sed 's/^/    /'
        passed+=("$name (${dt} s)")
    else
        if [[ $rc == 124 || $rc == 137 ]]; then  # timeout's codes for TERM and for KILL after --kill-after
            why="out of its ${budget} s budget ($budget_var raises it)"
        else
            why="exit code $rc"
        fi
        echo "[$name] FAILED after ${dt} s: $why; last lines of $log:"
        tail -n 25 "$log" | sed 's/^/    /'
        failed+=("$name: $why")
    fi
}

{
    echo "date: $(date -Is)"
    echo "nvidia-smi -L: ${smi_gpus:-(none)}"
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi 2>&1 || true; fi
    echo "SSLAM_FAST_BACKEND=${SSLAM_FAST_BACKEND:-(unset)} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-(unset)}"
} >"$LOG_DIR/env.log"
if [[ -n ${SSLAM_FAST_BACKEND:-} ]]; then
    echo "gpu_check: note: SSLAM_FAST_BACKEND=$SSLAM_FAST_BACKEND replaces 'auto' in every op"
fi

run_stage setup 90 scripts/setup_env.sh
if [[ $torch_checked == 0 ]] && ! torch_sees_cuda; then
    if ((${#failed[@]} > 0)); then
        echo "gpu_check: the set-up failed and torch cannot see a CUDA device; see $LOG_DIR/setup.log" >&2
        exit 1
    fi
    no_cuda "torch.cuda.is_available() is False after the set-up (a CPU-only torch build, or a driver problem)"
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s); device 0: "
      f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")' 2>&1 | tee -a "$LOG_DIR/env.log" || true

run_stage tests 90 "$PY" -m pytest -q -m cuda
run_stage bench_ops 100 "$PY" benchmarks/bench_ops.py --device cuda --plot
run_stage bench_fbank 20 "$PY" benchmarks/bench_fbank.py --device cuda --plot
run_stage bench_masks 20 "$PY" benchmarks/bench_masks.py --device cuda --plot
# set but empty: no extra arguments (both stages, as bench_train's default)
read -r -a train_args <<<"${GPU_CHECK_TRAIN_ARGS---stage sslam}"
run_stage bench_train 150 "$PY" benchmarks/bench_train.py --device cuda --preset base --write --plot "${train_args[@]}"

# --- 3. summary ------------------------------------------------------------------------------------------------------
cp benchmarks/RESULTS.md "$LOG_DIR/RESULTS.md"
cp benchmarks/charts/*_cuda*.png "$LOG_DIR/" 2>/dev/null || true
{
    echo "gpu_check: $((SECONDS - start)) s in all; logs in $LOG_DIR"
    for p in "${passed[@]}"; do echo "  ok      $p"; done
    for f in "${failed[@]}"; do echo "  FAILED  $f"; done
} | tee "$LOG_DIR/summary.txt"
if ((${#failed[@]} > 0)); then
    echo "gpu_check: ${#failed[@]} stage(s) failed" >&2
    exit 1
fi
echo "gpu_check: all stages passed; the GPU sections of benchmarks/RESULTS.md are updated"
