#!/usr/bin/env bash
# On a machine with a CUDA PyTorch (and none of Debian's packages): builds the tests, the examples and
# the benchmark against that PyTorch's LibTorch, runs the tests (the [cuda] test case and every
# device check run on the GPU there), benchmarks every backbone on CUDA, and prints a short table last.
#
#   scripts/vendor-headers.sh          # once, on the Debian machine: fills third_party/
#   scripts/gpu-check.sh [OUT_DIR]     # on the GPU machine, from the repository root
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

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B build-gpu "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
  -DDIFFUSION_THIRD_PARTY_DIR="$PWD/third_party" -DDIFFUSION_INSTALL=OFF
cmake --build build-gpu -j "$(nproc)"

status=0
(cd build-gpu && ctest --output-on-failure -j 4 2>&1) | tee "$out/test.log" || status=1

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
tail -4 "$out/test.log" | grep -E "tests passed|tests failed" || true
exit $status
