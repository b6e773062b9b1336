#!/usr/bin/env bash
# The seed post's experiment, measured: its SmolMLP and ChunkyMLP (which it reports as producing noise)
# against the convolutional backbones after the same CPU budget (about 3 minutes of training each on
# 2 cores, the seed's recipe: batch 128, AdamW 1e-3, plus EMA 0.999), each scored on 500 DDIM-50
# samples. Needs data/mnist and runs/classifier.pt (scripts/run-example.sh makes both) and a built
# build/examples/diffusion/diffusion. Prints one line per backbone; see docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
mnist=build/examples/diffusion/diffusion
out=${1:-runs/budget}
mkdir -p "$out"
# name | flags that make ~3 minutes here (measured throughputs: smol ~1,800 img/s, chunky ~220,
# conv-small ~150, unet ~250)
runs=(
  "smol|--backbone smol --epochs 5"
  "chunky|--backbone chunky --epochs 1 --limit 40064"
  "conv-small|--backbone conv-small --epochs 1 --limit 27008"
  "unet|--backbone unet --epochs 3 --max-steps 117"
)
for entry in "${runs[@]}"; do
  name=${entry%%|*}
  flags=${entry#*|}
  rm -rf "$out/$name"
  start=$(date +%s)
  # shellcheck disable=SC2086
  $mnist train $flags --batch-size 128 --lr 1e-3 --ema 0.999 --grid 16 --val-size 500 --out "$out/$name" \
    >"$out/$name.train.log" 2>&1
  minutes=$(awk -v s="$start" -v e="$(date +%s)" 'BEGIN { printf "%.1f", (e - s) / 60 }')
  ckpt=$(ls "$out/$name"/checkpoints/checkpoint_epoch_*.pt | tail -n 1)
  $mnist evaluate --checkpoint "$ckpt" --classifier runs/classifier.pt --sampler ddim --steps 50 --n 500 --seed 0 \
    >"$out/$name.eval.log" 2>&1
  fd=$(grep -oP 'Frechet distance: +\K[0-9.]+' "$out/$name.eval.log")
  rate=$(grep -oP 'digit rate: +\K[0-9.]+' "$out/$name.eval.log")
  smallest=$(grep -oP 'smallest class share \K[0-9.]+' "$out/$name.eval.log")
  printf '%-10s %5s min  FD %8s  digit rate %s  smallest class %s\n' "$name" "$minutes" "$fd" "$rate" "$smallest" \
    | tee -a "$out/summary.txt"
done
