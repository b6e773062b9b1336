#!/usr/bin/env bash
# Real colour images from a package: fetches Twemoji (scripts/fetch-emoji.sh; CC-BY 4.0), trains a
# class-conditional UNet on them at 32x32 RGB on white, one class per emoji category, then samples a grid
# with one row per category under classifier-free guidance. The recipe is the MNIST main command's, at
# 32x32 with wider top levels, for EPOCHS epochs (default 40: about 10 minutes on 2 CPU cores).
# Extra arguments go to `diffusion train` and win over the recipe's. Leaves in OUT (default runs/emoji):
# checkpoints/, samples/epoch_NNN.png, metrics.jsonl and category_grid.png. See docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${DATA:-data/emoji}
out=${OUT:-runs/emoji}
epochs=${EPOCHS:-40}
scripts/install-deps.sh
scripts/fetch-emoji.sh "$data"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B build "${generator[@]}" -DCMAKE_BUILD_TYPE=Release
cmake --build build --parallel "$(nproc)" --target diffusion_cli
mnist=build/examples/diffusion/diffusion

$mnist train --data "$data" --size 32 --channels 3 --conditional --out "$out" --backbone unet --widths 32,64,128 \
  --blocks 1,1,2 --epochs "$epochs" --batch-size 64 --lr 2e-3 --lr-schedule cosine --warmup 200 --min-snr-gamma 5 \
  --ema 0.999 --val-size 200 --grid 36 --grid-steps 50 --keep-epochs 2 --resume "$@"
latest=$(ls "$out"/checkpoints/checkpoint_epoch_*.pt | tail -n 1)
# One row per category, 8 emoji each, class-conditional with guidance weight 2.
$mnist sample --checkpoint "$latest" --classes all --n 8 --nrow 8 --cfg 2 --sampler dpmpp-2m-sde --steps 15 \
  --spacing trailing --seed 0 --out "$out"/category_grid.png
