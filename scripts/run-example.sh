#!/usr/bin/env bash
# The main job: installs what is missing, fetches MNIST, builds the MNIST example, trains a backbone
# that fits a CPU (conv-small: the seed's ConvNet at widths 32,64) for one epoch, then samples a grid
# from the checkpoint. Extra arguments go to `mnist train` (e.g. --epochs 3, --backbone conv --device cuda).
# Re-running resumes from the newest checkpoint in runs/mnist.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
scripts/fetch-mnist.sh data/mnist
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B build "${generator[@]}" -DCMAKE_BUILD_TYPE=Release
cmake --build build --parallel "$(nproc)" --target mnist

build/examples/mnist/mnist train --data data/mnist --out runs/mnist --backbone conv-small --epochs 1 --ema 0.999 \
  --resume "$@"
latest=$(ls runs/mnist/checkpoints/checkpoint_epoch_*.pt | tail -n 1)
build/examples/mnist/mnist sample --checkpoint "$latest" --n 25 --out runs/mnist/sample_grid.png --seed 0
