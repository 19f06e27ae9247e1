#!/usr/bin/env bash
# Copies the small records of every finished run under SRC (config.json, summary.json,
# metrics.csv; not checkpoints or plots) into DST, keeping the directory tree, so that
# `optim4rl reproduce --report-only --out DST` (or `compare` with the same --out) can rebuild
# its report from them on any machine, long after the run directories are gone.
#
#   scripts/keep_records.sh /work/runs/paper-regime experiments/paper_regime
set -euo pipefail
if [ $# -ne 2 ]; then echo "usage: $0 SRC DST" >&2; exit 2; fi
src=$1 dst=$2
[ -d "$src" ] || { echo "keep_records: error: no directory $src" >&2; exit 2; }
count=0
while IFS= read -r -d '' summary; do
  run=$(dirname "$summary")
  [ -f "$run/config.json" ] && [ -f "$run/metrics.csv" ] || continue
  rel=${run#"$src"/}
  mkdir -p "$dst/$rel"
  cp "$run/config.json" "$run/summary.json" "$run/metrics.csv" "$dst/$rel/"
  count=$((count + 1))
done < <(find "$src" -path "$dst" -prune -o -name summary.json -path '*/runs/*' -print0)
echo "keep_records: $count finished runs copied from $src to $dst"
