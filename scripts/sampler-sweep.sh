#!/usr/bin/env bash
# The samplers over noise levels on one checkpoint, at equal model-call budgets: each row is
# `diffusion evaluate` on 1,000 samples (seed 0, x_0 clamped to [-1, 1]) and prints a markdown table row
# (sampler, plan, budget, steps, FD, KID +- its standard error, digit rate), unguided and autoguided by GUIDE
# (w = 2, two calls a step). N sets the sample count (1,000 by default; 10,000 where a row decides something).
# A budget of C calls is C steps unguided and C/2 guided; Heun's S steps cost 2S - 1 calls.
#
#   scripts/sampler-sweep.sh runs/mnist/checkpoints/checkpoint_epoch_008.pt runs/mnist/checkpoints/checkpoint_epoch_002.pt
#   SAMPLERS="heun dpmpp-2m" BUDGETS="10 30" PLAN=karras scripts/sampler-sweep.sh CK GUIDE
#
# THREADS=N sets evaluate's --threads (0, the default: all cores).
# Needs data/mnist and runs/classifier.pt (scripts/run-example.sh makes both) and build/examples/diffusion/diffusion.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: scripts/sampler-sweep.sh CHECKPOINT GUIDE_CHECKPOINT" >&2; exit 2; }
checkpoint=$1 guide=$2
mnist=${MNIST:-build/examples/diffusion/diffusion}
samplers=${SAMPLERS:-dpmpp-2m euler-a heun dpmpp-3m-sde}
budgets=${BUDGETS:-10 15 20 30}
plan=${PLAN:-karras}
n=${N:-1000}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
row() {  # SAMPLER PLAN BUDGET STEPS GUIDED
  local extra=()
  [ "$5" = yes ] && extra=(--guide "$guide" --guidance 2)
  "$mnist" evaluate --checkpoint "$checkpoint" --classifier runs/classifier.pt --data data/mnist --n "$n" --seed 0 \
    --sampler "$1" --plan "$2" --steps "$4" --threads "${THREADS:-0}" "${extra[@]}" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
  printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" "$5" \
    "$(grep -oP 'Frechet distance: +\K[0-9.]+' "$log")" "$(grep -oP 'kernel distance: +\K-?[0-9.]+ \+- [0-9.]+' "$log")" \
    "$(grep -oP 'digit rate: +\K[0-9.]+' "$log")"
}
echo "| sampler | plan | calls | steps | autoguided | FD | KID | digit rate |"
echo "|---|---|---:|---:|---|---:|---:|---:|"
for sampler in $samplers; do
  for budget in $budgets; do
    for guided in no yes; do
      calls=$budget
      [ "$guided" = yes ] && calls=$((budget / 2))
      steps=$calls
      [ "$sampler" = heun ] && steps=$(((calls + 1) / 2))
      row "$sampler" "$plan" "$budget" "$steps" "$guided"
    done
  done
done
