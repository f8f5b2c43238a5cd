#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU, CUDA torch installed and no network:
#   benchmarks/gpu_suite.sh OUTDIR
# builds mishkit._C with CUDA, runs the GPU-marked tests, runs the kernel / BN+act / network
# benchmarks, writes logs and results (JSON lines + PNG + summary.md) into OUTDIR and prints a
# short summary table last. Budget: under 10 minutes on an H100 (the kernel grid gets whatever
# time the build and tests left, and records the cases it had no time for as skipped).
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "cannot create OUTDIR $1" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
TOTAL_BUDGET_S=${MISHKIT_SUITE_BUDGET_S:-540}  # leaves a minute of the 10 for slack
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
cd "$REPO" || exit 2

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: torch sees no CUDA device ($PYTHON); this suite needs an NVIDIA GPU" >&2
    exit 2
fi
{ nvidia-smi || true; "$PYTHON" -m pip list 2>/dev/null | grep -iE "^(torch|triton) " || true
} > "$OUT/environment.log" 2>&1

echo "[$(elapsed) s] building mishkit._C with CUDA (log: $OUT/build.log)"
MISHKIT_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout 300 \
    "$PYTHON" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
BUILD_RC=$?
"$PYTHON" -m mishkit info > "$OUT/info.log" 2>&1

echo "[$(elapsed) s] GPU-marked tests (log: $OUT/tests.log)"
timeout 240 "$PYTHON" -m pytest tests -m gpu -q -p no:cacheprovider \
    --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
TESTS_RC=$?

# the kernel grid gets what is left, minus ~100 s for BN+act, network, memory table and plots
# and ~200 s for the compile suite (six Inductor compiles of forward + backward graphs)
KERNEL_BUDGET=$(( TOTAL_BUDGET_S - $(elapsed) - 300 ))
(( KERNEL_BUDGET < 30 )) && KERNEL_BUDGET=30
echo "[$(elapsed) s] benchmarks, kernel grid budget ${KERNEL_BUDGET} s (log: $OUT/bench.log)"
timeout $(( KERNEL_BUDGET + 440 )) "$PYTHON" -m benchmarks --preset gpu --device cuda \
    --out "$OUT/results" --time-budget "$KERNEL_BUDGET" > "$OUT/bench.log" 2>&1
BENCH_RC=$?

status() {
    case $1 in
        0) echo "ok" ;;
        5) echo "no tests selected (exit 5, see $2)" ;;  # pytest: nothing carried the gpu mark
        *) echo "FAILED (exit $1, see $2)" ;;
    esac
}
{
    echo
    echo "## mishkit GPU suite: $(elapsed) s"
    echo
    echo "| step | status |"
    echo "|---|---|"
    echo "| build (CUDA) | $(status $BUILD_RC build.log) |"
    echo "| GPU tests | $(status $TESTS_RC tests.log): $(grep -v "^\s*$" "$OUT/tests.log" | tail -n 1) |"
    echo "| benchmarks | $(status $BENCH_RC bench.log) |"
    echo
    if [[ -f "$OUT/results/summary.md" ]]; then
        # the targets table, then our Mish rows at the headline size (the rest: summary.md)
        sed -n '/^## Targets/,/^## Kernels/p' "$OUT/results/summary.md" | sed '$d'
        awk '/^## Kernels/ {on = 1; print; next} /^## / {on = 0}
             on && (/^\| activation/ || /^\|---/ || /^\| mish /)' "$OUT/results/summary.md"
        echo
    fi
    echo "results: $OUT/results (results.jsonl, summary.md, *.png); logs: $OUT/*.log"
    echo "to commit: cp -r $OUT/results/. benchmarks/results/<device>/"
} | tee "$OUT/suite_summary.md"
[[ $BUILD_RC -eq 0 && $TESTS_RC -eq 0 && $BENCH_RC -eq 0 ]]
