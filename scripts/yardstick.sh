#!/usr/bin/env bash
# The key sampler rows of docs/results.md ("The yardstick"), each `diffusion evaluate` on N samples (1,000 by
# default; N=10000 for the deciding rows), seed 0, x_0 clamped to [-1, 1], autoguided by the run's epoch
# 2 at w = 2 unless the row says unguided. Prints one line per row: FD, KID +- its standard error, digit
# rate; the full output goes to runs/yardstick/ROW-N.log.
#
#   scripts/yardstick.sh main 3m heun                 # 1,000 samples each
#   N=10000 scripts/yardstick.sh main heun
#
# Rows: main (dpmpp-2m-sde, trailing, 15 steps: the main command's), 3m (dpmpp-3m-sde, trailing, 15),
# heun (trailing, 8), 2m (dpmpp-2m, trailing, 15), eulera (euler-a, trailing, 15), ddim50 (ddim, leading,
# 50), main-unguided (dpmpp-2m-sde, trailing, 30, unguided). Needs runs/mnist (scripts/run-example.sh),
# runs/classifier.pt, data/mnist and build/examples/diffusion/diffusion; RUN=DIR for another run directory.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${N:-1000}
run_dir=${RUN:-runs/mnist}
mnist=${MNIST:-build/examples/diffusion/diffusion}
checkpoint=$run_dir/checkpoints/checkpoint_epoch_008.pt
guide=$run_dir/checkpoints/checkpoint_epoch_002.pt
mkdir -p runs/yardstick
row() {  # NAME SAMPLER PLAN STEPS GUIDED
  local extra=() log=runs/yardstick/$1-$n.log start=$SECONDS
  [ "$5" = yes ] && extra=(--guide "$guide" --guidance 2)
  "$mnist" evaluate --checkpoint "$checkpoint" --classifier runs/classifier.pt --data data/mnist --n "$n" --seed 0 \
    --sampler "$2" --plan "$3" --steps "$4" --clip-x0 1 "${extra[@]}" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
  echo "$1 (N=$n, $((SECONDS - start)) s): FD $(grep -oP 'Frechet distance: +\K[0-9.]+' "$log"), KID" \
    "$(grep -oP 'kernel distance: +\K-?[0-9.]+ \+- [0-9.]+' "$log"), digit rate $(grep -oP 'digit rate: +\K[0-9.]+' "$log")"
}
[ $# -gt 0 ] || { sed -n '2,15p' "$0" >&2; exit 2; }
for name in "$@"; do
  case $name in
    main) row main dpmpp-2m-sde trailing 15 yes ;;
    3m) row 3m dpmpp-3m-sde trailing 15 yes ;;
    heun) row heun heun trailing 8 yes ;;
    2m) row 2m dpmpp-2m trailing 15 yes ;;
    eulera) row eulera euler-a trailing 15 yes ;;
    ddim50) row ddim50 ddim leading 50 yes ;;
    main-unguided) row main-unguided dpmpp-2m-sde trailing 30 no ;;
    *) echo "yardstick.sh: unknown row '$name'" >&2; exit 2 ;;
  esac
done
