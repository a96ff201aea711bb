#!/usr/bin/env bash
# The GPU figures of the README, from a fresh clone on a machine with a GPU, given a CIFAR-10 folder
# (one that holds cifar-10-batches-py/, or where it may be downloaded):
#   bash bench/device_check.sh bench DATA_DIR OUT            # benchmark table -> OUT/bench.{json,log}
#   bash bench/device_check.sh train DATA_DIR OUT EPOCHS [S] # the notebook's cells on CIFAR-10, logs and
#                                                            # plots -> OUT, stopped after S seconds
#   bash bench/device_check.sh concurrency DATA_DIR OUT [K]  # K runs at once vs one -> OUT/concurrency.*
# Extra notebook parameters go in the OVERRIDES environment variable as a JSON object.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
what=${1:-}; data=${2:-}; out=${3:-}
if [ -z "$what" ] || [ -z "$data" ] || [ -z "$out" ]; then
  echo "usage: $0 bench DATA_DIR OUT | train DATA_DIR OUT EPOCHS [SECONDS] | concurrency DATA_DIR OUT [K]" >&2; exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1 || true
case "$what" in
bench)
  python3 bench/benchmark.py all --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
  ;;
train)
  timeout "${5:-540}" python3 bench/run_notebook.py dyt_cifar10.ipynb -p epochs "${4:?EPOCHS}" -p data_dir "$data" \
    -p checkpoint_dir /dev/shm/ck -p log_dir "$out/log" -p plot_dir "$out/plots" -p show_progress False \
    -p overrides "${OVERRIDES:-{\}}" 2>&1 | tee "$out/notebook.log"
  ;;
concurrency)
  python3 bench/concurrency.py --data-dir "$data" --k "${4:-2}" --epochs 6 --json "$out/concurrency.json" 2>&1 \
    | tee "$out/concurrency.log"
  ;;
*) echo "usage: $0 bench DATA_DIR OUT | train DATA_DIR OUT EPOCHS [SECONDS] | concurrency DATA_DIR OUT [K]" >&2; exit 2 ;;
esac
