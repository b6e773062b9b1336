#!/usr/bin/env bash
# The test command: installs what is missing, builds the library's tests and examples in build/,
# and runs every test (unit tests, packaging tests, the example's smoke run).
#
# On failure it names the stage that failed and exits with its code, so that callers (CI, the Debian 13
# leg in scripts/test-debian13.sh) can tell a missing package from a broken build from a failing test:
#   10  installing packages (scripts/install-deps.sh)
#   11  configuring or building
#   12  running the tests
# BUILD_DIR (default build) chooses the build directory.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${BUILD_DIR:-build}

stage() {
  local code=$1 name=$2
  shift 2
  echo "== test.sh: $name"
  if ! "$@"; then
    echo "test.sh: FAILED while $name (exit $code)" >&2
    exit "$code"
  fi
}

generator=()
configure_and_build() {
  command -v ninja >/dev/null && generator=(-G Ninja)
  cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release && cmake --build "$build" --parallel "$(nproc)"
}

stage 10 "installing packages" scripts/install-deps.sh
stage 11 "building" configure_and_build
stage 12 "running the tests" ctest --test-dir "$build" --parallel "$(nproc)" --output-on-failure
echo "test.sh: every test passed"
