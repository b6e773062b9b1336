#!/usr/bin/env bash
# The README's test command on Debian 13 ("trixie": LibTorch 2.6, Catch2 3, fmt 10, CLI11 2.4, g++ 14),
# from a Debian 12 (or any Debian) machine, as root: builds a Debian 13 root with debootstrap from
# Debian's mirror, copies this working tree into it and runs scripts/test.sh there under chroot (which
# installs the packages through scripts/install-deps.sh, builds and runs every test).
#
#   scripts/test-debian13.sh            # root cached in /var/cache/diffusion/debian13 (reused when present)
#   DEBIAN13_ROOT=/path scripts/test-debian13.sh
#   DEBIAN13_MIRROR=http://... scripts/test-debian13.sh
#   scripts/test-debian13.sh scripts/fuzz.sh 60     # another of this tree's scripts, run inside the root
#   DIFFUSION_CPU_CONV_CHECK=force scripts/test-debian13.sh   # every test with oneDNN off (docs/platforms.md)
#
# The root keeps its installed packages, its ccache and its build directory between runs, so a second
# run only rebuilds what changed. /proc, /sys and /dev are bound for the run and unmounted on exit,
# whether it passed, failed or was interrupted. On failure it says which stage failed:
#   20  making the root (debootstrap: is the mirror reachable?)
#   10  installing packages inside the root      (from scripts/test.sh)
#   11  building inside the root                 (from scripts/test.sh)
#   12  running the tests inside the root        (from scripts/test.sh)
#   21  anything else (mounting, copying the tree)
set -uo pipefail
cd "$(dirname "$0")/.."
src=$PWD
root=${DEBIAN13_ROOT:-/var/cache/diffusion/debian13}
mirror=${DEBIAN13_MIRROR:-http://deb.debian.org/debian}
suite=trixie
say() { echo "test-debian13: $*"; }
fail() {
  local code=$1
  shift
  say "FAILED: $*" >&2
  exit "$code"
}

[ "$(id -u)" -eq 0 ] || fail 21 "must run as root (debootstrap, mount and chroot need it)"
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }

# 1. The root, made once. A half-made one (interrupted debootstrap) is made anew: the marker file is
# written only after debootstrap succeeded.
if [ ! -f "$root/.diffusion-root-complete" ]; then
  if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap; } ||
      fail 20 "could not install debootstrap on this machine"
  fi
  if ! curl -fsS --max-time 30 -o /dev/null "$mirror/dists/$suite/Release"; then
    fail 20 "the mirror $mirror is unreachable (no $mirror/dists/$suite/Release); set DEBIAN13_MIRROR"
  fi
  say "making a Debian 13 root in $root from $mirror (about 5 minutes)"
  rm -rf "$root"
  mkdir -p "$(dirname "$root")"
  debootstrap --variant=minbase "$suite" "$root" "$mirror" > "$(dirname "$root")/debootstrap.log" 2>&1 ||
    fail 20 "debootstrap $suite from $mirror failed; see $(dirname "$root")/debootstrap.log"
  # No services start inside the chroot (packages' postinst scripts ask policy-rc.d).
  printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
  chmod +x "$root/usr/sbin/policy-rc.d"
  touch "$root/.diffusion-root-complete"
  say "root made ($(elapsed))"
else
  say "reusing the root in $root"
fi

# 2. Mounts, undone on every exit path.
mounted=()
cleanup() {
  local m
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    m=${mounted[i]}
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || say "could not unmount $m" >&2
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
bind() {
  mkdir -p "$root$1"
  mount --bind "$1" "$root$1" || fail 21 "could not bind $1 into $root"
  mounted+=("$root$1")
}
bind /proc
bind /sys
bind /dev
bind /dev/pts
cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true

# 3. This working tree (tracked and untracked files, not what git ignores: no build dirs, data or runs),
# rewriting only the files that changed since the last run, so that the build directory rebuilds only them.
dest=/work/diffusion
# One run at a time in the root (released when this script exits).
exec 9>"$root/.diffusion-lock"
flock -w 900 9 || fail 21 "another run has held $root for 15 minutes"
say "copying $src to $root$dest"
scripts/sync-tree.sh "$src" "$root$dest" || fail 21 "could not copy the working tree into the root"

# 4. The README's test command (or the script given) inside. Build directories live outside the copy, so
# ccache and the builds survive between runs.
command=("${@:-scripts/test.sh}")
build=/work/build-debian13
[ "${command[0]}" = scripts/test.sh ] || build=/work/build-debian13-$(basename "${command[0]}" .sh)
say "running ${command[*]} inside Debian 13 ($(elapsed) so far)"
chroot "$root" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  LANG=C.UTF-8 TERM=dumb BUILD_DIR=$build CCACHE_DIR=/root/.ccache DIFFUSION_IN_DEBIAN13_ROOT=1 \
  FUZZ_REPLAY_ONLY="${FUZZ_REPLAY_ONLY:-}" DIFFUSION_CPU_CONV_CHECK="${DIFFUSION_CPU_CONV_CHECK:-}" \
  /bin/bash -c "cd $dest && $(printf '%q ' "${command[@]}")"
status=$?
if [ "${command[0]}" != scripts/test.sh ]; then
  [ $status -eq 0 ] || fail "$status" "${command[*]} failed inside the Debian 13 root with status $status after $(elapsed)"
  say "${command[*]} passed in $(elapsed)"
  exit 0
fi
# What was tested on: the CPU (oneDNN's kernels differ by CPU: docs/platforms.md) and the library versions.
cpu=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
family=$(grep -m1 '^cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')
versions=$(chroot "$root" dpkg-query -W -f='${Package} ${Version}, ' libtorch2.6 libdnnl3.6 libopenblas0-pthread 2>/dev/null)
say "tested on ${cpu:-an unknown CPU} (cpu family ${family:-?}) with ${versions%, }"
case $status in
  0) say "passed in $(elapsed) (Debian 13: $(chroot "$root" dpkg-query -W -f='libtorch-dev ${Version}' libtorch-dev 2>/dev/null))" ;;
  10) fail 10 "installing the packages inside the Debian 13 root failed (apt; see above) after $(elapsed)" ;;
  11) fail 11 "the build failed on Debian 13 (see the compiler output above) after $(elapsed)" ;;
  12) fail 12 "tests failed on Debian 13 (see the ctest output above) after $(elapsed)" ;;
  *) fail 21 "scripts/test.sh exited with $status inside the root after $(elapsed)" ;;
esac
