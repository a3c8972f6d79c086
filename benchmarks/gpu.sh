#!/usr/bin/env bash
# GPU benchmark for a lent GPU (issue 5); finishes in under 8 minutes on one H100.
#
#   bash benchmarks/gpu.sh [--compile] [more gpu_bench.py options]
#
# 1. generates phantom data at the real size (256x256, about 3000 slices) with
#    `brainseg download synthetic` in a temporary folder;
# 2. runs benchmarks/gpu_bench.py on it: brainseg's epoch time (bf16, channels_last, data on
#    the GPU, optionally torch.compile) against a notebook-style reference and against the
#    FLOP floor at the measured bf16 matmul rate (MFU), peak GPU memory, inference slices/s.
#
# Results: gpu.json and gpu.log in $OUT when set (the device machine collects $OUT), else in
# benchmarks/results/. PATIENTS (default 85) sets the phantom patient count.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# use the source tree when brainseg is not installed (a bare GPU machine with torch)
if ! "$PY" -c "import brainseg" 2>/dev/null; then export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/brainseg-gpu-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export BRAINSEG_CACHE_DIR="$WORK/cache" PYTHONUNBUFFERED=1
LOG="$RESULTS/gpu.log"
{
  echo "# $(date -Is) bash benchmarks/gpu.sh $*"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  t0=$(date +%s)
  "$PY" -m brainseg download synthetic --dest "$WORK/data" --patients "${PATIENTS:-85}" --size 256
  echo "# phantoms generated in $(( $(date +%s) - t0 )) s"
  "$PY" benchmarks/gpu_bench.py --data "$WORK/data/kaggle_3m" --json "$RESULTS/gpu.json" "$@"
  echo "# total $(( $(date +%s) - t0 )) s"
} 2>&1 | tee "$LOG"
