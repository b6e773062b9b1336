#!/usr/bin/env bash
# A run resumed mid-epoch with another number of processes and another batch size (progress is counted in
# examples, so the rest of the epoch is the examples not yet seen, dealt out to the new layout):
#   1 -> 2: one process of batch 4 checkpoints after 2 of its 8 steps; two ranks of batch 3 (torchrun)
#           resume there and finish the epoch in 4 steps of 6;
#   2 -> 1: two ranks of batch 2 checkpoint after 2 of their 8 steps; one process of batch 5 finishes the
#           epoch in 5 steps (the last of 4).
# The later checkpoints are removed, as if each run had stopped at its step 2.
#   resume_ranks.sh PROGRAM TORCHRUN DATA_DIR OUT_DIR PORT
set -u
program=$1 torchrun=$2 data=$3 out=$4 port=$5
common=(train --data "$data" --backbone unet --widths 8,16 --grid 0 --val-size 0 --threads 1 --epochs 1 --keep 10)
one() { "$program" "${common[@]}" "$@"; }
two() { "$torchrun" --nproc_per_node 2 --master_port "$port" --no_python "$program" "${common[@]}" "$@"; }
stopped_at_step_2() {  # RUN_DIR: keep only the checkpoint written after step 2
  local mid="$1/checkpoints/checkpoint_epoch_000_step_000002.pt"
  [ -f "$mid" ] || { ls "$1/checkpoints"; echo "resume_ranks.sh: no checkpoint after step 2 in $1"; exit 1; }
  for f in "$1"/checkpoints/checkpoint_epoch_*.pt; do [ "$f" = "$mid" ] || rm -f "$f"; done
}
expect() {  # LOG PATTERN WHAT
  grep -q "$2" "$1" || { grep -v "^Epoch" "$1"; echo "resume_ranks.sh: $3"; exit 1; }
}
rm -rf "$out"
mkdir -p "$out"

one --out "$out/a" --batch-size 4 --checkpoint-every 2 > "$out/a1.log" 2>&1 || { cat "$out/a1.log"; exit 1; }
stopped_at_step_2 "$out/a"
two --out "$out/a" --batch-size 3 --resume > "$out/a2.log" 2>&1 || { cat "$out/a2.log"; echo "resume_ranks.sh: 1 -> 2 failed"; exit 1; }
expect "$out/a2.log" "resumed from epoch 0 (step 2)" "1 -> 2 did not resume at step 2"
expect "$out/a2.log" "data parallel: 2 ranks of batch 3 (global batch 6)" "1 -> 2 did not run on 2 ranks"
expect "$out/a2.log" "^epoch 1/1: train loss [0-9.]*" "1 -> 2 did not finish the epoch"
echo "resume_ranks.sh: 1 -> 2 resumed and finished the epoch"

two --out "$out/b" --batch-size 2 --checkpoint-every 2 > "$out/b1.log" 2>&1 || { cat "$out/b1.log"; exit 1; }
stopped_at_step_2 "$out/b"
one --out "$out/b" --batch-size 5 --resume > "$out/b2.log" 2>&1 || { cat "$out/b2.log"; echo "resume_ranks.sh: 2 -> 1 failed"; exit 1; }
expect "$out/b2.log" "resumed from epoch 0 (step 2)" "2 -> 1 did not resume at step 2"
expect "$out/b2.log" "^epoch 1/1: train loss [0-9.]*" "2 -> 1 did not finish the epoch"
echo "resume_ranks.sh: 2 -> 1 resumed and finished the epoch"
echo "resume_ranks.sh: passed"
