#!/usr/bin/env bash
# The main job: installs what is missing, fetches MNIST, builds the MNIST example, trains the UNet from
# scratch with the best sample quality per CPU minute we measured (about 28 minutes on 2 cores: widths
# 16,32,128 with two residual blocks at 7x7, 8 epochs at batch 64, AdamW 2e-3 with warm-up and a cosine
# decay, Min-SNR-5 loss weighting, EMA 0.999, bf16 autocast where the CPU has bf16 instructions, else
# fp32), keeping epoch 2's checkpoint beside the last. It then samples a grid with DDIM, autoguided by
# that early checkpoint (Karras et al. 2024: each step is steered away from the weaker model's errors),
# and scores 1,000 samples (Frechet distance with its bounds, digit rate, class histogram) with the
# LeNet classifier, which it trains once (about 80 s) into runs/classifier.pt.
# Extra arguments go to `mnist train` (e.g. --epochs 10, or --backbone conv --device cuda).
# Re-running resumes from the newest checkpoint in runs/mnist.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
scripts/fetch-mnist.sh data/mnist
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B build "${generator[@]}" -DCMAKE_BUILD_TYPE=Release
cmake --build build --parallel "$(nproc)" --target mnist
mnist=build/examples/mnist/mnist

# --precision defaults to auto: bf16 on a CPU with AMX/AVX512-BF16 (1.5x the fp32 speed here), else fp32.
# The per-epoch grids use DDIM 50 (about 1 s instead of 20 s of 1,000 DDPM steps per epoch).
$mnist train --data data/mnist --out runs/mnist --backbone unet --blocks 1,1,2 --epochs 8 --batch-size 64 \
  --lr 2e-3 --lr-schedule cosine --warmup 200 --min-snr-gamma 5 --ema 0.999 --grid 25 --grid-steps 50 \
  --keep-epochs 2 --resume "$@"
latest=$(ls runs/mnist/checkpoints/checkpoint_epoch_*.pt | tail -n 1)
# Autoguidance by epoch 2 of the same run (docs/results.md: digit rate 0.84 -> 0.92 on this recipe), when
# the run is longer than that.
guide=()
early=runs/mnist/checkpoints/checkpoint_epoch_002.pt
if [ -f "$early" ] && [ "$early" != "$latest" ]; then guide=(--guide "$early" --guidance 2); fi
$mnist sample --checkpoint "$latest" --n 25 --sampler ddim --steps 50 --eta 1 "${guide[@]}" \
  --out runs/mnist/sample_grid.png --seed 0
[ -f runs/classifier.pt ] || $mnist classifier --data data/mnist --out runs/classifier.pt
$mnist evaluate --checkpoint "$latest" --classifier runs/classifier.pt --data data/mnist --sampler ddim --steps 50 --eta 1 \
  "${guide[@]}" --n 1000 --seed 0 | tee runs/mnist/evaluation.txt
