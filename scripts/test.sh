#!/usr/bin/env bash
# The test command: installs what is missing, builds the library's tests and examples in build/,
# and runs every test (unit tests, packaging tests, the example's smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B build "${generator[@]}" -DCMAKE_BUILD_TYPE=Release
cmake --build build --parallel "$(nproc)"
ctest --test-dir build --parallel "$(nproc)" --output-on-failure
