#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, with Debian's clang and -fsanitize=fuzzer,address,undefined) in
# build-fuzz and runs each for SECONDS (default 60) from its seed corpus (fuzz/seeds/, plus the checkpoint
# fixture of the tests). Prints one line per target: executions, the corpus it grew, and crashes; a crash
# leaves its input in build-fuzz/crashes/TARGET/ and fails the script.
#   scripts/fuzz.sh [SECONDS]
#   FUZZ_REPLAY_ONLY="fuzz_checkpoint" scripts/fuzz.sh 60    (that target only replays its corpus)
# It needs Debian 13: clang cannot compile LibTorch 1.13's headers in C++20 against libstdc++ 12 (an
# incomplete c10::IValue inside std::vector, which C++20 makes constexpr), so on Debian 12 the script
# runs itself inside the Debian 13 root of scripts/test-debian13.sh (as root). It installs clang there.
# Exit status: 0 no crashes, 1 crashes found, 10 installing clang failed, 11 the build failed.
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
debian=$(cut -d. -f1 /etc/debian_version 2>/dev/null)
if [[ "$debian" =~ ^[0-9]+$ ]] && [ "$debian" -lt 13 ]; then
  echo "fuzz: Debian $debian's clang cannot build LibTorch's headers in C++20; running inside Debian 13"
  exec scripts/test-debian13.sh scripts/fuzz.sh "$seconds"
fi
scripts/install-deps.sh clang libclang-rt-dev || { echo "fuzz: FAILED installing clang" >&2; exit 10; }
build=${BUILD_DIR:-build-fuzz}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
CC=clang CXX=clang++ cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDIFFUSION_BUILD_FUZZERS=ON \
  -DDIFFUSION_BUILD_TESTS=OFF -DDIFFUSION_BUILD_EXAMPLES=OFF -DDIFFUSION_BUILD_BENCH=OFF -DDIFFUSION_INSTALL=OFF > /dev/null ||
  { echo "fuzz: FAILED while configuring (is clang installed?)" >&2; exit 11; }
cmake --build "$build" --parallel "$(nproc)" || { echo "fuzz: FAILED while building the fuzz targets" >&2; exit 11; }

declare -A seeds=([fuzz_idx]=fuzz/seeds/idx [fuzz_idx_gzip]=fuzz/seeds/idx [fuzz_checkpoint]=fuzz/seeds/checkpoint
                  [fuzz_safetensors]=fuzz/seeds/safetensors [fuzz_pickle]=fuzz/seeds/pickle [fuzz_npy]=fuzz/seeds/npy)
declare -A max_len=([fuzz_checkpoint]=200000)
# allocator_may_return_null: an allocation the machine cannot give fails as it does in a normal process
# (operator new throws std::bad_alloc), so a finding is an allocation the code does not survive, not one
# LibTorch's unpickler requests from a crafted pickle and the reader reports as a damaged file.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
status=0
for target in fuzz_idx fuzz_idx_gzip fuzz_safetensors fuzz_pickle fuzz_npy fuzz_checkpoint; do
  corpus=$build/corpus/$target crashes=$build/crashes/$target
  rm -rf "$crashes"  # only this run's findings count (past ones that mattered are seeds: fuzz/seeds/*/regression-*)
  mkdir -p "$corpus" "$crashes"
  cp -n "${seeds[$target]}"/* "$corpus"/ 2>/dev/null
  [ $target = fuzz_checkpoint ] && cp -n tests/fixtures/format1_convnet.pt "$corpus"/
  log=$build/$target.log
  # FUZZ_REPLAY_ONLY names targets that only run their corpus once (no mutation), e.g. while a finding is open.
  replay=(); [[ " ${FUZZ_REPLAY_ONLY:-} " == *" $target "* ]] && replay=(-runs=0)
  "$build/fuzz/$target" "$corpus" "${replay[@]}" -max_total_time="$seconds" -max_len="${max_len[$target]:-4096}" -timeout=20 \
    -rss_limit_mb=4096 -artifact_prefix="$crashes/" -print_final_stats=1 > "$log" 2>&1
  code=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  found=$(ls "$crashes" | wc -l)
  echo "fuzz: $target: ${runs:-?} executions in ${seconds} s, corpus $(ls "$corpus" | wc -l) inputs, $found crashes (exit $code)"
  if [ $code -ne 0 ] || [ "$found" -ne 0 ]; then
    status=1
    grep -m 20 -E "ERROR|SUMMARY|#0|#1|#2|#3" "$log" >&2
  fi
done
[ $status -eq 0 ] && echo "fuzz: no crashes" || echo "fuzz: FAILED: crashes found (inputs in $build/crashes/)" >&2
exit $status
