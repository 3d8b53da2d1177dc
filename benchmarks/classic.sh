#!/usr/bin/env bash
# The tables of docs/classic.md: every classic method on every data set, 5 seeds each, one
# JSON file per pair in runs/classic/ (finished pairs are skipped, so a rerun resumes).
# CPU only, single-threaded fits; 21.5 minutes measured on a busy 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/classic}
mkdir -p "$out"
for d in linnerud diabetes digits sparse lowrank; do
  for m in l21 trace instance network; do
    [ -f "$out/$d-$m.json" ] && continue
    echo "=== $d $m $(date +%T)"
    .venv/bin/mtlcv classic --method "$m" --dataset "$d" --seeds 0,1,2,3,4 --out "$out/$d-$m.json.tmp"
    mv "$out/$d-$m.json.tmp" "$out/$d-$m.json"
  done
done
