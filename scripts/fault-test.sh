#!/usr/bin/env bash
# Fault test: N amusd runs on the real default models, each with seeded random faults (SIGKILL, and
# SIGSTOP long enough to trip the heartbeat check) injected into either worker while it works.
# Every run must give exactly the undisturbed output, leak no region, and finish.
#
#   scripts/fault-test.sh [N=50] [MAX_NEW_TOKENS=64]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n="${1:-50}"
max_new="${2:-64}"
amusd=./target/release/amusd
[ -x "$amusd" ] || cargo build --release
prompt="Write a Python function that returns the n-th Fibonacci number, with a docstring and an example."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

before="$(ls /dev/shm | grep -c '^amusd-' || true)"
"$amusd" generate --strategy ar --prompt "$prompt" --max-new-tokens "$max_new" --json > "$tmp/ref.json" \
  || { echo "fault-test: the undisturbed ar run failed" >&2; exit 1; }
ref="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tokens"])' "$tmp/ref.json")"

identical=0; faults=0; restarts=0; worst=0; hangs=0; failed=0
for i in $(seq 1 "$n"); do
  if timeout 300 "$amusd" generate --strategy amusd --prompt "$prompt" --max-new-tokens "$max_new" --json \
      --chaos "$i" --chaos-signal mixed --chaos-faults 2 --chaos-rate 0.05 --hang-timeout-ms 1500 \
      > "$tmp/run.json" 2> "$tmp/run.err"; then
    got="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tokens"])' "$tmp/run.json")"
    [ "$got" = "$ref" ] && identical=$((identical + 1)) || echo "run $i: output differs" >&2
  else
    rc=$?
    [ $rc -eq 124 ] && hangs=$((hangs + 1))
    failed=$((failed + 1))
    echo "run $i: exit $rc: $(tail -1 "$tmp/run.err")" >&2
  fi
  line="$(grep 'faults injected' "$tmp/run.err" || true)"
  if [ -n "$line" ]; then
    f=$(sed -E 's/.*faults injected ([0-9]+).*/\1/' <<<"$line")
    r=$(sed -E 's/.*worker restarts ([0-9]+).*/\1/' <<<"$line")
    w=$(sed -E 's/.*worst recovery ([0-9]+) ms.*/\1/' <<<"$line")
    faults=$((faults + f)); restarts=$((restarts + r)); [ "$w" -gt "$worst" ] && worst=$w
  fi
  printf '\r%d/%d runs' "$i" "$n" >&2
done
echo >&2
after="$(ls /dev/shm | grep -c '^amusd-' || true)"
leaked=$((after - before)); [ $leaked -lt 0 ] && leaked=0
echo "runs $n, faults injected $faults, worker restarts $restarts, worst recovery ${worst} ms"
echo "identical $identical/$n, failed $failed, hangs $hangs, regions leaked $leaked"
[ "$identical" -eq "$n" ] && [ "$leaked" -eq 0 ] && [ "$hangs" -eq 0 ]
