#!/usr/bin/env bash
# Paper-scale meta-training on a lent GPU machine within a fixed wall-clock budget (how the
# *-gpu optimizer files were made). Runs from a copy of the repository root (its .git, if any, may be stale) without an
# install (`python -m optim4rl`); the commit is passed in OPTIM4RL_GIT_COMMIT and recorded in each
# run's provenance. Writes into $OUT: log.txt, gpu.csv (nvidia-smi samples) and, per run,
# NAME/{optimizer.o4r or optimizer_latest.o4r, metrics.csv, summary.json}.
#
#   OUT=/tmp/out OPTIM4RL_GIT_COMMIT=$(git rev-parse HEAD) bash scripts/device_meta_train.sh BUDGET_S \
#       NAME:PRESET[:ARGS...] ...
# Each run gets --time-limit = what is left of BUDGET_S (runs with under 90 s left are skipped);
# ARGS are extra meta-train arguments separated by commas, e.g. grid6:grid6:--num-agents,128.
set -uo pipefail
budget=$1; shift
start=$(date +%s)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/log.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/log.txt"
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 5 > "$OUT/gpu.csv" &
smi=$!
for spec in "$@"; do
  IFS=: read -r name preset extra <<< "$spec"
  left=$(( budget - ($(date +%s) - start) ))
  if (( left < 90 )); then echo "skip $name: ${left}s left" | tee -a "$OUT/log.txt"; continue; fi
  run=/tmp/runs/$name
  echo "== $name: preset $preset ${extra//,/ } time limit ${left}s" | tee -a "$OUT/log.txt"
  # shellcheck disable=SC2086
  timeout $(( left + 120 )) python3 -m optim4rl meta-train --preset "$preset" ${extra//,/ } \
      --set eval_steps=0 --set eval_every=0 --set checkpoint_every_s=1e9 --time-limit "$left" --out "$run" 2>&1 \
    | tr '\r' '\n' | awk '!/^meta-train / || NR % 25 == 0' | tee -a "$OUT/log.txt"
  mkdir -p "$OUT/$name"
  cp "$run"/optimizer*.o4r "$run"/metrics.csv "$run"/summary.json "$OUT/$name/" 2>/dev/null
done
kill $smi 2>/dev/null
echo "total $(( $(date +%s) - start ))s" | tee -a "$OUT/log.txt"
