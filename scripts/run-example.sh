#!/usr/bin/env bash
# The main job: installs what is missing, builds the quickstart example and runs it
# (trains a small ConvNet on synthetic 8x8 images, samples, prints the samples).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B build "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DDIFFUSION_BUILD_TESTS=OFF
cmake --build build --parallel "$(nproc)" --target quickstart
build/examples/quickstart/quickstart "$@"
