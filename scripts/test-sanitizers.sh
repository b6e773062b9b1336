#!/usr/bin/env bash
# The test suite under AddressSanitizer and UndefinedBehaviorSanitizer (GCC's), in its own build directory
# (build-asan): the unit tests, the examples' smoke runs and the Python round trip, with any report fatal.
# LibTorch itself is not instrumented (Debian's build); leak detection is off because LibTorch keeps
# process-lifetime allocations (thread pools, registries) that LeakSanitizer reports at exit.
#   scripts/test-sanitizers.sh            (after scripts/install-deps.sh; 30-70 minutes on 2 cores)
#   SANITIZERS_CACHE=/var/cache/diffusion/sanitizers scripts/test-sanitizers.sh
# With SANITIZERS_CACHE, the tree is copied to $SANITIZERS_CACHE/src (scripts/sync-tree.sh: only changed
# files are rewritten) and built in $SANITIZERS_CACHE/build, so that a run from a fresh clone (CI) rebuilds
# only what changed since the last run rather than everything.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${SANITIZERS_CACHE:-}" ]; then
  cache=$(realpath -m "$SANITIZERS_CACHE")
  mkdir -p "$cache" || { echo "test-sanitizers: FAILED making $cache" >&2; exit 11; }
  # One run at a time in the cache (the lock is released when the run, exec'd below, exits).
  exec 9>"$cache/.lock"
  flock -w 900 9 || { echo "test-sanitizers: FAILED: another run has held $cache for 15 minutes" >&2; exit 11; }
  scripts/sync-tree.sh . "$cache/src" || { echo "test-sanitizers: FAILED copying the tree to $cache/src" >&2; exit 11; }
  cd "$cache/src" && SANITIZERS_CACHE="" BUILD_DIR="$cache/build" exec scripts/test-sanitizers.sh
  echo "test-sanitizers: FAILED: could not run the copy in $cache/src" >&2
  exit 11
fi
build=${BUILD_DIR:-build-asan}
flags="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# -O1 -g1 (line tables only) rather than RelWithDebInfo's -O2 -g: reports still name file and line, and the
# build takes about 40% less time (docs/reliability.md).
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1 -DNDEBUG" \
  -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" -DDIFFUSION_BUILD_BENCH=OFF -DDIFFUSION_INSTALL=OFF ||
  { echo "test-sanitizers: FAILED while configuring" >&2; exit 11; }
cmake --build "$build" --parallel "$(nproc)" || { echo "test-sanitizers: FAILED while building" >&2; exit 11; }
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_init_order=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
ctest --test-dir "$build" --parallel "$(nproc)" --output-on-failure -LE packaging ||
  { echo "test-sanitizers: FAILED while running the tests under ASan/UBSan" >&2; exit 12; }
echo "test-sanitizers: every test passed under AddressSanitizer and UndefinedBehaviorSanitizer"
