#!/usr/bin/env bash
# The GPU figures of the README, from a fresh clone on a machine with a GPU, given a CIFAR-10 folder
# (one that holds cifar-10-batches-py/, or where it may be downloaded):
#   bash bench/device_check.sh bench DATA_DIR OUT [MODES] [E] [VE] # benchmark -> OUT/bench.{json,log}: the
#                                                                   # first mode (E epochs) against each other (VE)
#   bash bench/device_check.sh train DATA_DIR OUT EPOCHS [S]        # the notebook's cells, stopped after S s
#   bash bench/device_check.sh concurrency DATA_DIR OUT [K]         # K runs at once vs one
#   bash bench/device_check.sh sweep DATA_DIR OUT RUNS [K] [S] [GRID]  # python -m sweeps --runs RUNS [--grid GRID],
#                                                                   # K at a time, stopped after S s
# RECIPE (environment): the preset every run starts from (train, sweep), e.g. cvt-7/4 (config.RECIPES);
# OVERRIDES (environment, a JSON object): config fields for every run (train, sweep, concurrency);
# NAME: the sweep's name (default "sweep"), also the base of its run names. MODES (bench): default
# graphs,cudnn,flash,combo,eval10k (the speed issue's block B: about 6 minutes on an H100 with a cold kernel
# cache, each mode in its own process, each mode's figures kept as it finishes; a mode the card lacks is
# skipped with the reason). Each call times fresh runs; the kernel cache stays in /tmp/device_check_bench for
# the next call. TINY=1: a tiny model, the CPU dry run of the same command (2 minutes on a 2-core CPU):
#   TINY=1 bash bench/device_check.sh bench - OUT eager,compile 3 2
# The exit status is the run's: non-zero when a mode failed or the time limit cut it (124).
# OUT receives at most 8 files (the device tool brings back no more): the logs, the tables, gpu.txt
# and one .tgz of the run folders (CSV, text log, config, plots; no checkpoints).
# A stopped sweep still writes its table: unfinished runs are summarised from their CSV so far.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
usage="usage: $0 bench DATA_DIR OUT [MODES] [E] [VE] | train DATA_DIR OUT EPOCHS [S] | concurrency DATA_DIR OUT [K] | sweep DATA_DIR OUT RUNS [K] [S] [GRID]"
what=${1:-}; data=${2:-}; out=${3:-}
if [ -z "$what" ] || [ -z "$data" ] || [ -z "$out" ]; then echo "$usage" >&2; exit 2; fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1 || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$out/gpu.txt" 2>&1
date -u +%Y-%m-%dT%H:%M:%SZ >> "$out/gpu.txt"
work=$(mktemp -d)

# The config overrides for runs writing under $work: OVERRIDES plus the data and output folders.
overrides() {
  python3 - "$data" "$work" <<'EOF'
import json, os, sys
o = json.loads(os.environ.get("OVERRIDES") or "{}")
o.setdefault("run_name", os.environ.get("NAME") or "sweep")  # the runs are named <NAME>_<overrides>
o.update(data_dir=sys.argv[1], download=False, checkpoint_dir="/tmp/device_check_ck",
         log_dir=f"{sys.argv[2]}/log", plot_dir=f"{sys.argv[2]}/plots")
print(json.dumps(o))
EOF
}

case "$what" in
bench)
  timeout -s INT -k 30 570 python3 bench/benchmark.py train --json "$out/bench.json" \
    --modes "${4:-graphs,cudnn,flash,combo,eval10k}" --epochs "${5:-6}" --variant-epochs "${6:-4}" \
    --out /tmp/device_check_bench ${TINY:+--tiny} 2>&1 | tee "$out/bench.log"
  rc=$?
  ;;
train)
  timeout -s INT -k 60 "${5:-540}" python3 bench/run_notebook.py dyt_cifar10.ipynb -p epochs "${4:?EPOCHS}" \
    -p data_dir "$data" -p checkpoint_dir /tmp/device_check_ck -p log_dir "$work/log" -p plot_dir "$work/plots" \
    -p progress lines -p recipe "${RECIPE:-default}" -p overrides "${OVERRIDES:-{\}}" 2>&1 | tee "$out/notebook.log"
  rc=$?
  tar czf "$out/train.tgz" -C "$work" .
  ;;
concurrency)
  python3 bench/concurrency.py --data-dir "$data" --k "${4:-2}" --epochs 6 --overrides "${OVERRIDES:-{\}}" \
    --json "$out/concurrency.json" 2>&1 | tee "$out/concurrency.log"
  rc=$?
  ;;
sweep)
  name=${NAME:-sweep}
  args=(--runs "${4:?RUNS}" --recipe "${RECIPE:-default}" --overrides "$(overrides)" --per-gpu "${5:-2}" --name "$name")
  if [ -n "${7:-}" ]; then args+=(--grid "$7"); fi
  timeout -s INT -k 60 "${6:-500}" python3 -m sweeps "${args[@]}" 2>&1 | tee "$out/sweep.log"
  rc=$?
  python3 -m sweeps "${args[@]}" --table-only 2>&1 | tee "$out/table.txt"
  cp "$work/log/${name}_runs.csv" "$work/log/${name}_groups.csv" "$out/" 2>/dev/null
  tar czf "$out/sweep.tgz" -C "$work" .
  ;;
*) echo "$usage" >&2; exit 2 ;;
esac
ls -la "$out"
exit "$rc"  # the run's own status (124: cut by its time limit), not the listing's
