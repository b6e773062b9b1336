#!/usr/bin/env bash
# Speed regression check: builds another revision's program (`diffusion`, before that `mnist`) and `diffusion_bench` beside this tree's and
# runs them alternately, several rounds, on the same machine and data. Prints every round, the median
# of each side with their ratio, and the median of the rounds' own ratios (this tree, or REV2, over REV:
# above 1 is faster). The paired median follows each round's pair, so a machine whose speed drifts
# between rounds moves it less than the ratio of the medians; quote both. How a change to the
# training step, the loop or the sampler is checked before it lands (docs/performance.md).
#
#   bench/compare.sh fe478bb              fe478bb against the working tree (uncommitted changes included)
#   bench/compare.sh fe478bb 589ed15      two revisions
#   ROUNDS=5 bench/compare.sh HEAD~1      more rounds (default 3)
#   WHAT=bench bench/compare.sh HEAD~1    only the benchmark's step (WHAT=train: only the training command)
#   BUILD_ONLY=1 bench/compare.sh fe478bb build both sides now, measure later when the machine is idle
#
# Two measurements, both on MNIST (scripts/fetch-mnist.sh):
#   train  the README's main training command for one epoch of the first 9,600 images (UNet, blocks 1,1,2, batch 64, cosine lr,
#          warm-up, Min-SNR, EMA; no grids, no validation): the epoch's img/s as `diffusion train` prints it.
#   bench  diffusion_bench's training step for the same UNet at batch 64 in bf16 (BENCH_ARGS to change):
#          the first row's bare step (step_img_per_s in its JSON). Where one side's bench predates the
#          bare step (before 73314f5), both sides' Trainer step (train_img_per_s) instead, and where one
#          predates `unet-main` (before e89fc47), both run the default UNet: the script says which.
# Each side runs with the same threads (THREADS, default: every core) and an environment cleared to
# PATH, HOME and the variables OPENBLAS_*, OMP_*, MALLOC_*, GLIBC_TUNABLES and DIFFUSION_* (so that both
# sides see the same ones; programs from 73314f5 on leave glibc's malloc thresholds to MALLOC_* when set). A run that fails leaves its output in build-compare/last-failure.log. Builds are cached in build-compare/<commit> (Release, ccache when
# present); the working tree's in build-compare/worktree. Quote the CPU with the numbers
# (`grep -m1 'cpu family' /proc/cpuinfo`): the script prints it.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
root=$PWD
rounds=${ROUNDS:-3}
what=${WHAT:-both}
threads=${THREADS:-$(nproc)}
limit=${LIMIT:-9600}
data=${DATA:-data/mnist}
say() { echo "compare: $*" >&2; }
die() { say "$*"; exit 2; }

usage="usage: bench/compare.sh REV [REV2]   (see the comment at the top of bench/compare.sh)"
[[ ${1:-} != -h && ${1:-} != --help ]] || { echo "$usage"; exit 0; }
[ $# -ge 1 ] && [ $# -le 2 ] || die "$usage"
[[ $threads =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a positive integer, got '$threads'"
[[ $limit =~ ^[1-9][0-9]*$ ]] || die "LIMIT must be a positive integer, got '$limit'"
for rev in "$@"; do git rev-parse --verify -q "$rev^{commit}" > /dev/null || die "'$rev' is not a revision of this repository"; done
case $what in both|train|bench) ;; *) die "WHAT must be both, train or bench, got '$what'" ;; esac
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$rounds'"
[ -f "$data/train-images-idx3-ubyte" ] || [ -f "$data/train-images-idx3-ubyte.gz" ] || scripts/fetch-mnist.sh "$data"
data=$(cd "$data" && pwd)

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)

# build SRC_DIR BUILD_DIR: configures (examples and bench only) and builds the program and diffusion_bench.
build() {
  local src=$1 dir=$2
  mkdir -p "$dir"
  say "building $(basename "$dir") ($src)"
  cmake -S "$src" -B "$dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DDIFFUSION_BUILD_TESTS=OFF \
    -DDIFFUSION_BUILD_EXAMPLES=ON -DDIFFUSION_BUILD_BENCH=ON > "$dir/configure.log" 2>&1 ||
    die "configuring $src failed: $dir/configure.log"
  # The program was examples/mnist (target and binary mnist) before it became examples/diffusion (target
  # diffusion_cli, binary diffusion).
  local program=diffusion_cli
  [ -d "$src/examples/diffusion" ] || program=mnist
  cmake --build "$dir" --parallel "$(nproc)" --target "$program" diffusion_bench > "$dir/build.log" 2>&1 ||
    die "building $src failed: $dir/build.log"
}

# side REV|"": prints the build directory of that revision (or of the working tree), building it.
side() {
  local rev=$1
  if [ -z "$rev" ]; then
    build "$root" "$root/build-compare/worktree"
    echo "$root/build-compare/worktree"
    return
  fi
  local sha
  sha=$(git rev-parse --verify -q "$rev^{commit}") || die "'$rev' is not a revision of this repository"
  local src=$root/build-compare/src-$sha dir=$root/build-compare/$sha
  if [ ! -d "$src" ]; then
    # Into a temporary folder first: an interrupted extraction is never taken for a complete one.
    rm -rf "$src.part" && mkdir -p "$src.part"
    git archive "$sha" | tar -x -C "$src.part" || die "could not extract $sha into $src.part"
    mv "$src.part" "$src"
  fi
  build "$src" "$dir"
  echo "$dir"
}

name_a=$1
name_b=${2:-working tree}
dir_a=$(side "$1")
dir_b=$(side "${2:-}")

bin() { find "$1" -type f -name "$2" -perm -u+x | head -1; }
program() { local p; p=$(bin "$1/examples/diffusion" diffusion 2>/dev/null); [ -n "$p" ] && echo "$p" || bin "$1" mnist; }
mnist_a=$(program "$dir_a"); mnist_b=$(program "$dir_b")
bench_a=$(bin "$dir_a" diffusion_bench); bench_b=$(bin "$dir_b" diffusion_bench)
[ -n "$mnist_a" ] && [ -n "$mnist_b" ] && [ -n "$bench_a" ] && [ -n "$bench_b" ] || die "a build has no program (diffusion or mnist) or diffusion_bench"
[ -z "${BUILD_ONLY:-}" ] || { say "built $dir_a and $dir_b"; exit 0; }
backbone=unet-main key=step_img_per_s
for b in "$bench_a" "$bench_b"; do
  help=$("$b" --help 2>&1 || true)
  [[ $help == *unet-main* ]] || backbone=unet
  [[ $help == *--profile* ]] || key=train_img_per_s
done

mapfile -t kept < <(env | grep -E '^(OPENBLAS_|OMP_|MALLOC_|GLIBC_TUNABLES=|DIFFUSION_)' || true)
run_env() { env -i PATH="$PATH" HOME="${HOME:-/root}" "${kept[@]}" "$@"; }
failure_log=$root/build-compare/last-failure.log

# train MNIST: img/s of the main command's epoch.
train() {
  local out
  out=$(mktemp -d)
  local img_s
  local log
  log=$(run_env "$1" train --data "$data" --out "$out" --backbone unet --blocks 1,1,2 --epochs 1 --limit "$limit" \
    --batch-size 64 --lr 2e-3 --lr-schedule cosine --warmup 200 --min-snr-gamma 5 --ema 0.999 --grid 0 --val-size 0 \
    --threads "$threads" 2> "$out.stderr") || true
  img_s=$(sed -n 's/^epoch 1\/1:.* \([0-9.]*\) img\/s.*/\1/p' <<< "$log")
  if [ -z "$img_s" ]; then
    { echo "$log"; cat "$out.stderr"; } > "$failure_log"
    rm -rf "$out" "$out.stderr"
    die "$1 train printed no epoch line (its output: $failure_log)"
  fi
  rm -rf "$out" "$out.stderr"
  echo "$img_s"
}

# bench BENCH: the first row's img/s under $key.
bench() {
  local args=${BENCH_ARGS:---data $data --backbones $backbone --precision bf16 --batch 64 --steps 20 --warmup 3 --reverse-steps 1}
  local log value
  # shellcheck disable=SC2086
  log=$(run_env "$1" $args --json --threads "$threads" 2>&1) || true
  value=$(sed -n "s/.*\"$key\": \([0-9.]*\).*/\1/p" <<< "$log" | sed -n 1p)
  [ -n "$value" ] || { echo "$log" > "$failure_log"; die "$1 printed no result row (its output: $failure_log)"; }
  echo "$value"
}
ratio() { awk -v b="$1" -v a="$2" 'BEGIN { printf "%.3f", b / a }'; }

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(grep -m1 'cpu family' /proc/cpuinfo | tr -d '\t'); $threads threads"
echo "A = $name_a ($(git rev-parse --short "$1")), B = $name_b; $rounds rounds, alternating (A first in odd rounds)"
[ "$what" = train ] || echo "bench: --backbones $backbone, $key"
declare -A results
kinds=()
[ "$what" != bench ] && kinds+=(train)
[ "$what" != train ] && kinds+=(bench)
for ((r = 1; r <= rounds; ++r)); do
  for kind in "${kinds[@]}"; do
    if [ "$kind" = train ]; then ba=$mnist_a; bb=$mnist_b; else ba=$bench_a; bb=$bench_b; fi
    if ((r % 2)); then a=$($kind "$ba"); b=$($kind "$bb"); else b=$($kind "$bb"); a=$($kind "$ba"); fi
    results[$kind.a]+="$a "; results[$kind.b]+="$b "; results[$kind.r]+="$(ratio "$b" "$a") "
    printf 'round %d %-5s  A %8.1f img/s   B %8.1f img/s   B/A %s\n' "$r" "$kind" "$a" "$b" "$(ratio "$b" "$a")"
  done
done
for kind in "${kinds[@]}"; do
  ma=$(tr ' ' '\n' <<< "${results[$kind.a]}" | grep . | median)
  mb=$(tr ' ' '\n' <<< "${results[$kind.b]}" | grep . | median)
  mr=$(tr ' ' '\n' <<< "${results[$kind.r]}" | grep . | median)
  wins=$(tr ' ' '\n' <<< "${results[$kind.r]}" | grep . | awk '$1 > 1 { n++ } END { print n + 0 }')
  printf 'median %-5s  A %8.1f img/s   B %8.1f img/s   B/A %s (ratio of the medians)\n' "$kind" "$ma" "$mb" "$(ratio "$mb" "$ma")"
  printf 'paired %-5s  B/A %.3f (median of the %d rounds\x27 ratios; B faster in %d of them)\n' "$kind" "$mr" "$rounds" "$wins"
done
