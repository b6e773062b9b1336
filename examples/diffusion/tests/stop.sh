#!/usr/bin/env bash
# SIGTERM during `diffusion train`: the run finishes its step, writes a checkpoint, says how to resume and exits
# 130; resuming from that checkpoint finishes the epoch it stopped in. (Batches of 2 from 32 images: 16 steps
# an epoch, so the signal usually lands mid-epoch; when it lands on an epoch's last step, the run says it
# stopped after that epoch and the resumed run goes on with the next.) A second signal ends the process at
# once (128 + 15). While the first run trains, a second one into the same directory is refused.
#   stop.sh MNIST DATA_DIR OUT_DIR
set -u
program=$1 data=$2 out=$3
pid=
trap '[ -n "$pid" ] && kill -KILL $pid 2>/dev/null' EXIT  # never leave a training run behind
rm -rf "$out" "$out.twice"
train=("$program" train --data "$data" --out "$out" --backbone unet --widths 8,16 --batch-size 2 --grid 0 --val-size 0
       --threads 1)
wait_for_start() {  # LOG
  for _ in $(seq 200); do grep -q "^training" "$1" 2>/dev/null && return; sleep 0.05; done
}

"${train[@]}" --epochs 100000 > "$out.log" 2>&1 &
pid=$!
wait_for_start "$out.log"
if "${train[@]}" --epochs 1 > "$out.second.log" 2>&1; then echo "stop.sh: a second run into $out was not refused"; exit 1; fi
grep -q "another training run (pid $pid) is writing to" "$out.second.log" || { cat "$out.second.log"; echo "stop.sh: wrong refusal"; exit 1; }
sleep 1
kill -TERM $pid
wait $pid
status=$?
cat "$out.log" | grep -v "^Epoch"
[ $status -eq 130 ] || { echo "stop.sh: expected exit 130 after SIGTERM, got $status"; exit 1; }
grep -q "resume with: .* --resume" "$out.log" || { echo "stop.sh: no resume hint"; exit 1; }
epoch=$(sed -n 's/.*stopped on request at epoch \([0-9]*\), step.*/\1/p' "$out.log")
if [ -n "$epoch" ]; then
  ls "$out"/checkpoints/checkpoint_epoch_*_step_*.pt > /dev/null 2>&1 || { echo "stop.sh: no mid-epoch checkpoint"; exit 1; }
  resumed=$((epoch - 1)) where="in epoch $epoch"
else
  done_epochs=$(sed -n 's/.*stopped on request after epoch \([0-9]*\) (global.*/\1/p' "$out.log")
  [ -n "$done_epochs" ] || { echo "stop.sh: no stop message"; exit 1; }
  epoch=$((done_epochs + 1)) resumed=$done_epochs where="after epoch $done_epochs"
fi

# Resume: finish the epoch it stopped in (or the next one).
"${train[@]}" --epochs "$epoch" --resume > "$out.resume.log" 2>&1
status=$?
grep -v "^Epoch" "$out.resume.log"
[ $status -eq 0 ] || { echo "stop.sh: the resumed run failed ($status)"; exit 1; }
grep -q "resumed from epoch $resumed (step" "$out.resume.log" || { echo "stop.sh: did not resume where it stopped"; exit 1; }
grep -q "^epoch $epoch/$epoch: train loss" "$out.resume.log" || { echo "stop.sh: the resumed epoch did not finish"; exit 1; }

# Two signals in a row: the second ends the process without waiting for the step.
# (A wide network, so that a step takes long enough for both signals to land within it.)
"$program" train --data "$data" --out "$out.twice" --backbone unet --widths 64,128,256 --batch-size 32 --epochs 100000 --grid 0 --val-size 0 \
  --threads 1 > "$out.twice.log" 2>&1 &
pid=$!
wait_for_start "$out.twice.log"
sleep 1
kill -TERM $pid
sleep 0.2  # two signals at once would merge into one
kill -TERM $pid
wait $pid
status=$?
[ $status -eq 143 ] || { echo "stop.sh: expected exit 143 after a second SIGTERM, got $status"; exit 1; }
echo "stop.sh: passed (stopped $where, resumed; a second signal exits $status)"
