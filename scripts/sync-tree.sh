#!/usr/bin/env bash
# Makes DEST a copy of the working tree of SRC (its tracked files and untracked files git does not ignore:
# no build directories, data or runs), rewriting only the files whose content differs and deleting those
# no longer in the tree. A file whose content is unchanged keeps its modification time, so a build
# directory kept outside DEST rebuilds only what changed; copying the whole tree anew (tar, cp -a from a
# fresh clone) would give every file a new time and rebuild everything.
#   scripts/sync-tree.sh SRC DEST
# Used by scripts/test-debian13.sh (the tree inside the Debian 13 root) and scripts/test-sanitizers.sh
# (SANITIZERS_CACHE). rsync does the comparing: it is installed when missing.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: scripts/sync-tree.sh SRC DEST" >&2; exit 2; }
src=$(cd "$1" && pwd) || { echo "sync-tree: SRC $1 is not a directory" >&2; exit 2; }
dest=$(realpath -m "$2")
# DEST is replaced by the copy, so refuse what would lose data: DEST inside SRC or SRC inside DEST (the
# same folder included), and a non-empty DEST that this script did not make (it leaves a marker file).
marker=.sync-tree-copy
case "$dest/" in "$src"/*) echo "sync-tree: DEST $dest is inside SRC $src" >&2; exit 2 ;; esac
case "$src/" in "$dest"/*) echo "sync-tree: SRC $src is inside DEST $dest" >&2; exit 2 ;; esac
if [ -e "$dest" ] && [ ! -f "$dest/$marker" ] && [ -n "$(ls -A "$dest" 2>/dev/null)" ]; then
  echo "sync-tree: DEST $dest is not empty and holds no earlier copy (no $marker); refusing to replace it" >&2
  exit 2
fi
if ! command -v rsync >/dev/null; then
  echo "sync-tree: installing rsync"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends rsync; } >/dev/null ||
    { echo "sync-tree: could not install rsync" >&2; exit 1; }
fi
# The tree is staged first (git lists its files), so that --delete removes exactly what left the tree.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 755 "$stage"  # rsync --perms gives DEST the stage's mode (mktemp's is 0700)
(cd "$src" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -C "$stage" -xf -
mkdir -p "$dest"
# --checksum: compare contents, not times; no --times: a rewritten file gets the time of the copy (newer
# than any build output), an unchanged one keeps its own.
rsync --recursive --links --perms --checksum --delete --exclude="/$marker" "$stage/" "$dest/"
touch "$dest/$marker"
