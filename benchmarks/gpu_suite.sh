#!/usr/bin/env bash
# The GPU evidence run, for a machine with an NVIDIA GPU, CUDA torch and no network:
#   benchmarks/gpu_suite.sh --quick OUTDIR    stages 0-3 (build, Triton + CUDA Mish correctness,
#                                              Mish bandwidth at 2^26), about 4 minutes
#   benchmarks/gpu_suite.sh OUTDIR            all stages (+ the other GPU tests, BN+act /
#                                              network / memory benchmarks, compute-sanitizer),
#                                              about 8 minutes on an H200
#   benchmarks/gpu_suite.sh --rehearsal OUTDIR   the same flow on a CPU-only machine (CI)
# OUTDIR receives four files, rewritten after every stage: summary.md, suite.log, results.jsonl,
# results.tar.gz. The exit status is non-zero when any stage, test, suite or contender failed;
# the summary names which. Stages and limits: benchmarks/gpu_suite.py.
# Environment: PYTHON (default python3), MAX_JOBS (14), TORCH_CUDA_ARCH_LIST (9.0).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
exec "${PYTHON:-python3}" -m benchmarks.gpu_suite "$@"
