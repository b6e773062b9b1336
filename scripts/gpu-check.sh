#!/usr/bin/env bash
# On a machine with a CUDA PyTorch (and none of Debian's packages): builds the tests, the examples and
# the benchmark against that PyTorch's LibTorch, runs the tests (the [cuda] test case and every
# device check run on the GPU there), benchmarks every backbone on CUDA, and prints a short table last.
# With 2 or more GPUs it also trains the MNIST example's smoke run as 2 ranks over NCCL (torchrun), when
# the wheel's nccl.h is found (the nvidia-nccl package pip installs beside a CUDA torch) and the Gloo
# headers c10d includes (in the LibTorch's include folder, or the system's) so that diffusion::distributed builds.
#
#   scripts/vendor-headers.sh          # once, on the Debian machine: fills third_party/
#   scripts/gpu-check.sh [OUT_DIR]     # on the GPU machine, from the repository root
#   CTEST_ARGS='-R cuda|edm' scripts/gpu-check.sh    # a subset of the tests (a 15-minute device lease
#                                                    # does not fit the whole suite: its CPU tests are slow there)
#
# OUT_DIR (default build-gpu/out) receives test.log, bench.jsonl and table.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build-gpu/out}
mkdir -p "$out"
py=${PYTHON:-python3}
prefix=$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')
"$py" -c 'import torch; print("PyTorch", torch.__version__, "CUDA", torch.version.cuda, "GPU",
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")'
[ -f third_party/fmt/core.h ] || { echo "third_party/ is missing: run scripts/vendor-headers.sh on a Debian machine" >&2; exit 1; }

gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
nccl=()
nccl_dir=$("$py" -c 'import os, nvidia.nccl as n; print(os.path.join(list(n.__path__)[0], "include"))' 2>/dev/null || true)
[ -n "$nccl_dir" ] && [ -f "$nccl_dir/nccl.h" ] && nccl=(-DDIFFUSION_WITH_NCCL=ON -DDIFFUSION_NCCL_INCLUDE_DIR="$nccl_dir")

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B build-gpu "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
  -DDIFFUSION_THIRD_PARTY_DIR="$PWD/third_party" -DDIFFUSION_INSTALL=OFF "${nccl[@]}"
cmake --build build-gpu -j "$(nproc)"

status=0
# The [python] tests need Debian's python3-torch at /usr/bin/python3, which such a machine does not have.
# shellcheck disable=SC2086
(cd build-gpu && ctest --output-on-failure -j 4 -LE python ${CTEST_ARGS:-} 2>&1) | tee "$out/test.log" || status=1

build-gpu/bench/diffusion_bench --device cuda --backbones conv,conv-small,smol,chunky,unet --steps 20 --warmup 5 \
  --full-sample --json | tee "$out/bench.log" | grep '^{' > "$out/bench.jsonl" || status=1

"$py" - "$out/bench.jsonl" <<'PY' | tee "$out/table.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for r in rows:
    if r.get("measure") == "matmul_gflops":
        print(f"{r.get('precision', 'fp32')} matmul: {r['value']:.0f} GFLOP/s on {r['device']}")
print(f"{'backbone':<11} {'precision':>9} {'train img/s':>12} {'reverse step (25 img)':>22} {'1000-step sample':>17} {'peak RSS MiB':>13}")
for r in rows:
    if "backbone" in r:
        print(f"{r['backbone']:<11} {r.get('precision', 'fp32'):>9} {r['train_img_per_s']:>12.1f} {r['reverse_step_s']*1e3:>19.2f} ms"
              f" {r['full_sample_s']:>9.2f} s ({r['full_sample'][:5]}) {r['peak_rss_mib']:>6.0f}")
PY
# Two ranks over NCCL, one GPU each (LOCAL_RANK), on the smoke run's data (written by the tests' make_idx).
gloo=$(sed -n 's/^DIFFUSION_GLOO_INCLUDE_DIR:PATH=//p' build-gpu/CMakeCache.txt)
if [ "$gpus" -ge 2 ] && [ ${#nccl[@]} -gt 0 ] && [ -n "$gloo" ] && [ "${gloo%NOTFOUND}" = "$gloo" ]; then
  data=build-gpu/examples/diffusion/smoke/data
  [ -f "$data/train-images-idx3-ubyte" ] || build-gpu/tests/make_idx "$data" 32 8
  rm -rf "$out/ddp"
  "$py" -m torch.distributed.run --nproc_per_node 2 --master_port 29677 --no_python build-gpu/examples/diffusion/diffusion train \
    --data "$data" --out "$out/ddp" --backbone unet --widths 8,16 --batch-size 8 --epochs 2 --grid 4 --grid-steps 3 \
    --val-size 8 --device cuda 2>&1 | tee "$out/ddp.log" || status=1
  grep -q "data parallel: 2 ranks" "$out/ddp.log" && grep -q "^epoch 2/2" "$out/ddp.log" || { echo "2-rank NCCL run: FAILED"; status=1; }
else
  echo "2-rank NCCL run: skipped ($gpus GPU(s); nccl.h: ${nccl_dir:-not found}; c10d's Gloo headers: ${gloo:-not found})"
fi
tail -4 "$out/test.log" | grep -E "tests passed|tests failed" || true
exit $status
