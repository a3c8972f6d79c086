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
# 3. (issue 13) when LGG_DATA names a kaggle_3m folder (the 25 dev patients, or all 110), the
#    full-size cross-validation: `brainseg cv` at 256 x 256, 5 folds, 20 epochs, batch 16,
#    --config best, the encoder weights of ENCODER_WEIGHTS (default imagenet), time-boxed by
#    CV_SECONDS (default 300). cv is resumable: a run cut by the box continues where it
#    stopped when the script runs again with the same CV_DIR. LGG_ARCHIVE may instead name a
#    .tar.zst / .tar.xz / .tar.gz of a kaggle_3m folder, unpacked first.
#
# Results: gpu.json, gpu.log (and cv/ with cv_summary.json) in $OUT when set (the device
# machine collects $OUT), else in benchmarks/results/. PATIENTS (default 85) sets the
# phantom patient count.
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
  if [ -n "${LGG_ARCHIVE:-}" ] && [ -f "$LGG_ARCHIVE" ]; then
    mkdir -p "$WORK/lgg"
    case "$LGG_ARCHIVE" in
      *.zst) zstd -dc "$LGG_ARCHIVE" | tar -xf - -C "$WORK/lgg" ;;
      *) tar -xf "$LGG_ARCHIVE" -C "$WORK/lgg" ;;
    esac
    LGG_DATA="$(dirname "$(find "$WORK/lgg" -type d -name kaggle_3m | head -n 1)")/kaggle_3m"
  fi
  if [ -n "${LGG_DATA:-}" ] && [ -d "$LGG_DATA" ]; then
    t1=$(date +%s)
    rc=0
    timeout "${CV_SECONDS:-300}" "$PY" -m brainseg cv "$LGG_DATA" --folds 5 --config best \
      --image-size 256 --epochs 20 --batch-size 16 --device cuda \
      --encoder-weights "${ENCODER_WEIGHTS:-imagenet}" \
      --project "${CV_DIR:-$RESULTS/cv}" --name exp --json > "$RESULTS/cv.json" || rc=$?
    echo "# cv (256x256, 5 folds, 20 epochs): exit $rc after $(( $(date +%s) - t1 )) s" \
      "(124: cut by CV_SECONDS; run again to continue)"
  else
    echo "# cv skipped: set LGG_DATA to a kaggle_3m folder (or LGG_ARCHIVE) for the full-size cv"
  fi
  echo "# total $(( $(date +%s) - t0 )) s"
} 2>&1 | tee "$LOG"
