#!/usr/bin/env bash
# The main job from a fresh clone: sets up .venv, builds the extension, and runs the controlled
# ReLU-vs-Mish segmentation experiment on the embedded synthetic ADE20K-layout dataset
# (generated on first use). Report: runs/experiment/report.{md,json,png}.
# Extra arguments go to the experiment (e.g. --out DIR, --jobs N).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
"$PY" -m mishkit info
"$PY" -m segmentation.experiment --cfg segmentation/configs/synthetic-experiment.yaml \
  --out runs/experiment "$@"
