#!/usr/bin/env bash
# Fault test: N amusd runs on the real default models, each with one seeded fault scenario, in turn:
#   chaos      built-in --chaos: SIGKILL/SIGSTOP of either worker while it works on the request
#   outside    `amusd worker-kill` (kill or stop) of either worker at a random moment of the run:
#              while it loads, while it waits for the other, or while it works
#   ready      SIGSTOP of a worker as soon as it is Ready (loaded, waiting for the request)
#   coord      SIGSTOP of the coordinator for 1-3 s, then SIGCONT
#   corrupt    a region whose worker pid says another process (a sentinel), then -1:
#              `amusd worker-kill` must refuse both; the run goes on
#   full       a /dev/shm too small for the region (a private 256 KiB tmpfs): a clean error
#   hostile    another user keeps swapping a FIFO and a file in and out under /dev/shm/amusd-*,
#              and leaves a region name with terminal escapes: runs and `amusd dump` go on, print no
#              raw escape
# Every run must give exactly the undisturbed output (or, for `full`, a one-line error), finish
# before a hard deadline, leave no region, and signal nothing else: a sentinel process of the same
# user must survive the whole test.
#
#   scripts/fault-test.sh [N=105] [MAX_NEW_TOKENS=64]
#   AMUSD_BIN=DIR picks the binaries (default target/release); PROMPT_FILE=F another prompt (a long
#   one puts the faults inside a split prefill's ring: see the README's split prefill).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n="${1:-105}"
max_new="${2:-64}"
bin="${AMUSD_BIN:-./target/release}"
amusd="$bin/amusd"
[ -x "$amusd" ] || cargo build --release
deadline=300
prompt="Write a Python function that returns the n-th Fibonacci number, with a docstring and an example."
[ -n "${PROMPT_FILE:-}" ] && prompt="$(cat "$PROMPT_FILE")"
tmp="$(mktemp -d)"
chmod 755 "$tmp"
sleep 100000 & sentinel=$!
cleanup() {
  kill "$sentinel" 2>/dev/null
  [ -n "${swapper:-}" ] && { pkill -u 65534 -f "amusd-hostile-swap-" 2>/dev/null; kill "$swapper" 2>/dev/null; }
  rm -f /dev/shm/amusd-hostile-* 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

tokens() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["tokens"])' "$1" 2>/dev/null; }
rand() { python3 -c "import random,sys; random.seed($1); print(random.${2})"; }
other_user() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
can_switch_user=0
[ "$(id -u)" -eq 0 ] && other_user true 2>/dev/null && can_switch_user=1

"$amusd" generate --strategy ar --prompt "$prompt" --max-new-tokens "$max_new" --json > "$tmp/ref.json" \
  || { echo "fault-test: the undisturbed ar run failed" >&2; exit 1; }
ref="$(tokens "$tmp/ref.json")"

# A hang timeout that a healthy worker meets on a machine loaded several times over (other builds):
# a 64-position prefill chunk or a slow load must not be taken for a hang.
gen_args=(generate --strategy amusd --prompt "$prompt" --max-new-tokens "$max_new" --json
          --hang-timeout-ms "${HANG_MS:-5000}" --max-restarts 6)

# Kills $pid after the deadline unless killed first (then it takes its sleep with it).
watch() {
  ( sleep "$deadline" & s=$!; trap 'kill $s; exit' TERM; wait $s; kill -9 "$pid" 2>/dev/null ) &
  watchdog=$!
}
# Starts amusd in the background with a hard deadline; sets $pid.
start() {
  "$amusd" "${gen_args[@]}" "$@" > "$tmp/run.json" 2> "$tmp/run.err" & pid=$!
  watch
}
# Waits for it; sets $rc (137 after the deadline).
finish() {
  wait "$pid"; rc=$?
  kill "$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null
}
region_of() { ls /dev/shm 2>/dev/null | grep -m1 "^amusd-$1-"; }
# Polls (up to 60 s) until `amusd dump` of the run's region satisfies a Python condition on `v`.
wait_dump() {
  local cond="$1" r i
  for i in $(seq 600); do
    r="$(region_of "$pid")"
    if [ -n "$r" ] && "$amusd" dump "/$r" --json 2>/dev/null | python3 -c "
import json,sys
v=json.load(sys.stdin); w={x['role']:x for x in v['workers']}
sys.exit(0 if ($cond) else 1)" 2>/dev/null; then
      region="/$r"; return 0
    fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
# The offset of the draft worker's pid in region $1, found as the two worker status blocks' pids
# ($2, $3) 512 bytes apart, so that this does not depend on the rest of the layout.
pid_offset() {
  python3 -c '
import mmap, struct, sys
with open("/dev/shm" + sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    d, v = int(sys.argv[2]), int(sys.argv[3])
    hits = [o for o in range(0, len(m) - 516, 4)
            if struct.unpack_from("<I", m, o)[0] == d and struct.unpack_from("<I", m, o + 512)[0] == v]
    assert len(hits) == 1, hits
    print(hits[0])' "$@"
}
# Writes the u32 $3 at offset $2 of region $1. The run may have finished and removed the region
# in the meantime; that is no error of amusd's, so it fails quietly.
poke() {
  python3 -c '
import mmap, struct, sys
with open("/dev/shm" + sys.argv[1], "r+b") as f:
    struct.pack_into("<I", mmap.mmap(f.fileno(), 0), int(sys.argv[2]), int(sys.argv[3]))' "$@" 2>/dev/null
}

scenarios=(chaos outside ready coord corrupt full hostile)
declare -A runs ok
for s in "${scenarios[@]}"; do runs[$s]=0; ok[$s]=0; done
identical=0; clean_errors=0; faults=0; restarts=0; worst=0; hangs=0; failed=0; leaked=0; stray=0
for i in $(seq 1 "$n"); do
  s="${scenarios[$(( (i - 1) % ${#scenarios[@]} ))]}"
  runs[$s]=$((runs[$s] + 1))
  want=identical; note=""
  case "$s" in
    chaos)
      start --chaos "$i" --chaos-signal mixed --chaos-faults 2 --chaos-rate 0.05
      finish ;;
    outside)
      role=$(rand "$i" 'choice(["draft","verify"])'); sig=$(rand "$i" 'choice(["kill","stop"])')
      delay=$(rand "$i" 'uniform(0.05, 2.5)')
      start; sleep "$delay"
      r="$(region_of "$pid")"
      [ -n "$r" ] && "$amusd" worker-kill "$role" --region "/$r" --signal "$sig" 2>> "$tmp/run.err"
      note="$sig $role after ${delay}s"
      finish ;;
    ready)
      role=$(rand "$i" 'choice(["draft","verify"])')
      start
      if wait_dump "w['$role']['state'] == 'Ready'"; then
        "$amusd" worker-kill "$role" --region "$region" --signal stop 2>> "$tmp/run.err"
      fi
      note="stopped the Ready $role worker"
      finish ;;
    coord)
      hold=$(rand "$i" 'uniform(1, 3)')
      start
      note="coordinator ended before it could be stopped"
      # The run may end between the dump and the signal: then there is nothing to stop.
      wait_dump "v['verified']['len'] > 0 and w['verify']['state'] == 'Busy'" \
        && kill -STOP "$pid" 2>/dev/null \
        && { note="coordinator stopped ${hold}s"; sleep "$hold"; kill -CONT "$pid"; }
      finish ;;
    corrupt)
      start
      if wait_dump "w['draft']['pid'] > 0 and w['verify']['pid'] > 0 and v['verified']['len'] > 0"; then
        # The run may end (and remove its region) between the two dumps.
        pids=$("$amusd" dump "$region" --json 2>/dev/null | python3 -c '
import json,sys; w={x["role"]:x for x in json.load(sys.stdin)["workers"]}; print(w["draft"]["pid"], w["verify"]["pid"])' 2>/dev/null) || pids=""
        read -r dpid vpid <<< "$pids"
        # A worker restarted since the dump (a false hang on a loaded machine) has another pid:
        # then there is nothing to corrupt safely this run.
        if [ -z "$pids" ]; then
          note="the run ended before the corruption; not corrupted"
        elif ! base=$(pid_offset "$region" "$dpid" "$vpid" 2>/dev/null); then
          note="a worker restarted before the corruption; not corrupted"
        else
        off=$((base + 512))
        poke "$region" "$off" "$sentinel"
        if "$amusd" worker-kill verify --region "$region" 2>> "$tmp/run.err"; then
          note="worker-kill signalled the sentinel's pid"; stray=$((stray + 1))
        else
          # Only once the sentinel's pid was refused: -1 would reach every process we may signal.
          poke "$region" "$off" 4294967295
          "$amusd" worker-kill verify --region "$region" 2>> "$tmp/run.err" \
            && { note="worker-kill signalled pid -1"; stray=$((stray + 1)); }
        fi
        poke "$region" "$off" "$vpid"
        fi
      fi
      finish ;;
    full)
      want=error
      # A private mount namespace with a /dev/shm too small for the region.
      unshare -m sh -c 'mount -t tmpfs -o size=256k tmpfs /dev/shm || exit 99
        "$0" "$@"; rc=$?; ls /dev/shm | grep -q "^amusd-" && exit 98; exit $rc' \
        "$amusd" "${gen_args[@]}" > "$tmp/run.json" 2> "$tmp/run.err" & pid=$!
      watch
      finish
      if [ "$rc" -eq 99 ]; then note="cannot mount a tmpfs: skipped"; want=skip; fi
      [ "$rc" -eq 98 ] && note="region left in the full /dev/shm"
      ;;
    hostile)
      if [ "$can_switch_user" -eq 0 ]; then
        want=skip; note="cannot switch user: skipped"; rc=0
      else
        esc="/dev/shm/amusd-hostile-$(printf '\033[31m')$i"
        other_user sh -c "printf x > '$esc'"
        f="/dev/shm/amusd-hostile-swap-$i"
        # Bounded by `timeout` and killed by name: `$!` is the subshell running the function, and
        # killing it alone left the other user's loop spinning.
        other_user timeout 120 sh -c "while :; do rm -f '$f'; : > '$f'; rm -f '$f'; mkfifo '$f'; done" & swapper=$!
        start
        finish
        timeout 20 "$amusd" dump > "$tmp/dump.txt" 2>&1; drc=$?
        pkill -u 65534 -f "amusd-hostile-swap-$i'" 2>/dev/null; kill "$swapper" 2>/dev/null
        wait "$swapper" 2>/dev/null; swapper=""
        rm -f "$esc" "$f"
        [ $drc -ne 0 ] && { note="amusd dump failed ($drc)"; rc=1; }
        grep -q $'\033' "$tmp/dump.txt" && { note="amusd dump printed a raw escape"; rc=1; }
      fi ;;
  esac
  if [ -n "$(region_of "$pid")" ]; then
    leaked=$((leaked + 1)); note="$note; left $(region_of "$pid")"
    "$amusd" dump --gc > /dev/null 2>&1
  fi
  if ! kill -0 "$sentinel" 2>/dev/null; then
    echo "run $i ($s): the sentinel process was killed" >&2; stray=$((stray + 1))
    sleep 100000 & sentinel=$!
  fi
  [ "$rc" -eq 137 ] && hangs=$((hangs + 1))
  if [ "$want" = skip ]; then
    ok[$s]=$((ok[$s] + 1))
  elif [ "$want" = error ]; then
    if [ "$rc" -ne 0 ] && [ "$rc" -lt 90 ] && grep -q "^amusd: error: no room in /dev/shm" "$tmp/run.err" \
        && [ "$(wc -l < "$tmp/run.err")" -le 2 ]; then
      clean_errors=$((clean_errors + 1)); ok[$s]=$((ok[$s] + 1))
    else
      failed=$((failed + 1)); echo "run $i ($s): exit $rc, $note: $(tail -2 "$tmp/run.err")" >&2
    fi
  elif [ "$rc" -eq 0 ] && [ "$(tokens "$tmp/run.json")" = "$ref" ]; then
    identical=$((identical + 1)); ok[$s]=$((ok[$s] + 1))
  else
    failed=$((failed + 1)); echo "run $i ($s): exit $rc, $note: $(tail -1 "$tmp/run.err")" >&2
  fi
  line="$(grep 'faults injected' "$tmp/run.err" || true)"
  if [ -n "$line" ]; then
    faults=$((faults + $(sed -E 's/.*faults injected ([0-9]+).*/\1/' <<<"$line")))
    w=$(sed -E 's/.*worst recovery ([0-9]+) ms.*/\1/' <<<"$line")
    [ "$w" -gt "$worst" ] && worst=$w
  fi
  restarts=$((restarts + $(grep -c 'restarting (' "$tmp/run.err")))
  printf '\r%d/%d runs' "$i" "$n" >&2
done
echo >&2
echo "runs $n: identical $identical, clean errors $clean_errors, failed $failed, hangs $hangs," \
     "regions leaked $leaked, stray signals $stray"
echo "chaos faults injected $faults, worker restarts $restarts (all scenarios), worst chaos recovery ${worst} ms"
for s in "${scenarios[@]}"; do printf '  %-8s %d/%d as expected\n' "$s" "${ok[$s]}" "${runs[$s]}"; done
[ "$failed" -eq 0 ] && [ "$leaked" -eq 0 ] && [ "$hangs" -eq 0 ] && [ "$stray" -eq 0 ]
