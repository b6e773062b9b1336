#!/usr/bin/env bash
# Copies the header-only dependencies the build needs besides LibTorch (fmt, Catch2 v2 with its CMake
# scripts, CLI11, stb, nlohmann-json) from this Debian machine into a folder (default: third_party/,
# which git ignores), for a machine that has a PyTorch but none of these packages. Build there with
#   cmake -S . -B build -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
#         -DDIFFUSION_THIRD_PARTY_DIR=$PWD/third_party
# scripts/gpu-check.sh does that. Run scripts/install-deps.sh here first.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-third_party}
mkdir -p "$dest/catch2" "$dest/stb"
rm -rf "$dest/fmt" "$dest/CLI" "$dest/nlohmann"
cp -r /usr/include/fmt "$dest/fmt"
cp -r /usr/include/CLI "$dest/CLI"
cp -r /usr/include/nlohmann "$dest/nlohmann"
cp /usr/include/catch2/catch.hpp "$dest/catch2/"
cp /usr/lib/cmake/Catch2/Catch.cmake /usr/lib/cmake/Catch2/CatchAddTests.cmake "$dest/catch2/"
cp /usr/include/stb/stb_image_write.h "$dest/stb/"
cp /usr/include/stb/stb_image.h /usr/include/stb/stb_image_resize.h "$dest/stb/"
du -sh "$dest"
