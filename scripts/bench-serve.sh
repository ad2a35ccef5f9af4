#!/usr/bin/env bash
# Load test of `amusd serve` and of llama.cpp's `llama-server` (same checkpoint, speculative
# decoding on, the same prompts) in one run: 1, 4 and 16 concurrent clients sending streamed greedy
# chat requests (scripts/load.py). Not run by CI (minutes, wants an idle machine; llama-server comes
# from ../shared/peers/llamacpp.sh).
#
#   scripts/bench-serve.sh                       # 4 HumanEval + 4 MT-Bench prompts, 64 new tokens
#   REQUESTS=16 MAX_NEW=64 CLIENTS=1,4,16 scripts/bench-serve.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REQUESTS=${REQUESTS:-16}
MAX_NEW=${MAX_NEW:-64}
CLIENTS=${CLIENTS:-1,4,16}
N=${N:-4}
home="${AMUSD_HOME:-$HOME/.cache/amusd}"
peer="${AMUSD_SHARED_DIR:-../shared}/peers/llamacpp.sh"
model="$home/models/SmolLM2-135M-Instruct.Q4_1.gguf"
tmp="$(mktemp -d)"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"' EXIT

scripts/first-turn-prompts.py "$N" "$home/datasets" > "$tmp/prompts.jsonl"

wait_health() { for _ in $(seq 1 600); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.5; done; echo "no health at $1" >&2; exit 1; }
echo "| server | clients | ok | requests/s | tokens/s | ttft p50 ms | ttft p99 ms | latency p50 ms | latency p99 ms |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"

./target/release/amusd serve --port 18181 --queue 64 2>"$tmp/amusd.log" & pids+=($!)
wait_health http://127.0.0.1:18181
python3 scripts/load.py http://127.0.0.1:18181 "$tmp/prompts.jsonl" --clients "$CLIENTS" \
    --requests "$REQUESTS" --max-tokens "$MAX_NEW" --label "amusd serve (amusd)"
kill -TERM "${pids[0]}"; wait "${pids[0]}" || true

if [ -x "$peer" ]; then
    bin="$("$peer" bin)"
    LD_LIBRARY_PATH="$bin" "$bin/llama-server" -m "$model" -md "$model" --spec-draft-n-max 8 \
        -t 2 -td 2 -c 4096 -np 1 --port 18182 >"$tmp/llama.log" 2>&1 & pids+=($!)
    wait_health http://127.0.0.1:18182
    python3 scripts/load.py http://127.0.0.1:18182 "$tmp/prompts.jsonl" --clients "$CLIENTS" \
        --requests "$REQUESTS" --max-tokens "$MAX_NEW" --label "llama-server (spec, 2 threads)"
fi
