#!/usr/bin/env bash
# Runs scripts/probe-onednn.py (does this machine's PyTorch compute CPU convolutions right?) with Debian's
# python3-torch, installing it first if it is missing. Arguments go to the probe (--quick, --verbose).
#   scripts/probe-onednn.sh                            # this machine's Debian and PyTorch
#   scripts/test-debian13.sh scripts/probe-onednn.sh   # inside the Debian 13 root: PyTorch 2.6, oneDNN 3.7
# Exit status: 0 every case agrees with float64, 1 some disagree, 2 PyTorch could not be installed.
set -uo pipefail
cd "$(dirname "$0")/.."
# Debian's python3 (a python3 earlier on PATH, e.g. pyenv's, does not see Debian's python3-torch).
py=/usr/bin/python3
[ -x "$py" ] || py=python3
if ! "$py" -c 'import torch' 2>/dev/null; then
  echo "probe-onednn: installing python3-torch"
  scripts/install-deps.sh >/dev/null || { echo "probe-onednn: could not install the packages" >&2; exit 2; }
fi
exec "$py" scripts/probe-onednn.py "$@"
