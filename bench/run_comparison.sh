#!/usr/bin/env bash
# The side-by-side run behind docs/performance.md: the library's benchmark and the seed's Python
# script (Debian's python3-torch, LibTorch 1.13.1 on both sides), same thread count, same MNIST data.
#   bench/run_comparison.sh [THREADS]      (needs: apt-get install python3-torch python3-torchvision)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-$(nproc)}
scripts/fetch-mnist.sh data/mnist
cmake --build build --target diffusion_bench
b=build/bench/diffusion_bench
# The ConvNet costs ~10 s a step on 2 cores: fewer timed steps for it. Every library row is measured in
# fp32 (the seed's arithmetic) and bf16 (autocast); the seed runs as published, then under autocast.
$b --data data/mnist --threads "$threads" --backbones conv --warmup 1 --steps 4 --reverse-steps 5 --json
$b --data data/mnist --threads "$threads" --backbones conv --warmup 1 --steps 4 --reverse-steps 5 --micro-batch 32 --json
$b --data data/mnist --threads "$threads" --backbones conv-small,smol,chunky,unet --warmup 2 --steps 20 --reverse-steps 9 --json
/usr/bin/python3 bench/seed_bench.py --data data/mnist --threads "$threads" --backbones conv --warmup 1 --steps 4 --reverse-steps 5
/usr/bin/python3 bench/seed_bench.py --data data/mnist --threads "$threads" --backbones smol,chunky --warmup 2 --steps 20 --reverse-steps 9
/usr/bin/python3 bench/seed_bench.py --data data/mnist --threads "$threads" --backbones conv,smol,chunky --warmup 2 --steps 20 --reverse-steps 9 --bf16
