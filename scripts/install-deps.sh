#!/usr/bin/env bash
# Installs the Debian packages diffusion needs (Debian 12 and 13 alike), skipping those already present.
#   libtorch-dev          LibTorch (Debian 12: 1.13.1, Debian 13: 2.6.0; CPU)
#   libopenblas0-pthread  an optimized BLAS: without it LibTorch falls back to reference BLAS and
#                         Linear layers run ~50x slower
#   catch2 (v2)           tests; libfmt-dev; zlib1g-dev (gzipped datasets); libstb-dev (PNG);
#   libcli11-dev          the MNIST example's command line; cmake, ninja-build, ccache, g++
#   nlohmann-json3-dev    JSON: checkpoint configs, metrics.jsonl, safetensors headers
#   python3-torch         the tests' Python side: weights written by PyTorch load in C++, and the other way;
#                         its torchrun launches the data-parallel example
#   libgloo-dev           the headers of Gloo, which LibTorch's c10d (data-parallel training) is built with
# Extra package names given as arguments are installed too (scripts/fuzz.sh asks for clang).
set -euo pipefail

packages=(g++ cmake ninja-build ccache curl ca-certificates libtorch-dev libopenblas0-pthread libfmt-dev catch2 zlib1g-dev libstb-dev
  libcli11-dev nlohmann-json3-dev python3-torch libgloo-dev "$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
