#!/usr/bin/env bash
# Runs a program as two ranks on 127.0.0.1 (the variables torchrun would set) and reports both.
#   run2.sh PROGRAM ARGS...      exit 0 when both ranks exit 0
#   EXPECT_RANK0_FAILURE_WITHIN=S run2.sh ...   exit 0 when rank 0 fails within S seconds instead
set -u
port=$(( 20000 + RANDOM % 20000 ))
out=$(mktemp -d)
trap 'kill -KILL $pid0 $pid1 2>/dev/null; rm -rf "$out"' EXIT
start=$(date +%s%N)  # nanoseconds; bash arithmetic, no bc needed
for rank in 0 1; do
  RANK=$rank LOCAL_RANK=$rank WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
    "$@" > "$out/rank$rank.log" 2>&1 &
  eval pid$rank=$!
done
wait $pid0; status0=$?
took_ms=$(( ($(date +%s%N) - start) / 1000000 ))
took=$(printf "%d.%03d" $((took_ms / 1000)) $((took_ms % 1000)))
wait $pid1; status1=$?
for rank in 0 1; do sed "s/^/[rank $rank] /" "$out/rank$rank.log"; done
if [ -n "${EXPECT_RANK0_FAILURE_WITHIN:-}" ]; then
  if [ $status0 -ne 0 ] && (( took_ms < EXPECT_RANK0_FAILURE_WITHIN * 1000 )); then
    echo "run2.sh: rank 0 failed after ${took} s, as expected"
    exit 0
  fi
  echo "run2.sh: rank 0 exited $status0 after ${took} s; expected a failure within $EXPECT_RANK0_FAILURE_WITHIN s"
  exit 1
fi
[ $status0 -eq 0 ] && [ $status1 -eq 0 ] && { echo "run2.sh: both ranks passed"; exit 0; }
echo "run2.sh: rank 0 exited $status0, rank 1 exited $status1"
exit 1
