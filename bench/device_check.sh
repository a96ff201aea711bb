#!/usr/bin/env bash
# The GPU figures of the README, taken in two calls of a lent GPU machine (the dataset travels in
# two halves, see ../shared/data/cifar10/README.md):
#   bash bench/device_check.sh bench            # carries .cifar/a: benchmark table -> $OUT/bench.*
#   bash bench/device_check.sh train EPOCHS [S] # carries .cifar/b: the notebook on real CIFAR-10,
#                                               # logs and plots -> $OUT, stopped after S seconds
set -uo pipefail
export PYTHONUNBUFFERED=1
case "${1:-}" in
bench)
  mkdir -p ~/cifar/webp && cp .cifar/a/* ~/cifar/webp/
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  python3 bench/benchmark.py all --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
  ;;
train)
  { cp -r .cifar/b/* ~/cifar/ && python3 ~/cifar/materialize.py ~/data; } > "$OUT/notebook.log" 2>&1 || exit 1
  timeout "${3:-540}" python3 bench/run_notebook.py dyt_cifar10.ipynb -p epochs "$2" -p data_dir ~/data \
    -p checkpoint_dir /dev/shm/ck -p log_dir "$OUT/log" -p plot_dir "$OUT/plots" -p show_progress False \
    2>&1 | tee -a "$OUT/notebook.log"
  ;;
*) echo "usage: $0 bench | train EPOCHS [SECONDS]" >&2; exit 2 ;;
esac
