#!/usr/bin/env bash
# Side by side, in one run on this machine: our forward costs, amusd's ar / sd / amusd, and
# llama.cpp (llama-bench, AR and speculative decoding, 1 and 2 threads) on the same prompts and
# the same checkpoint. Writes results/peers.md. Not run by CI (tens of minutes, needs an idle
# machine, builds llama.cpp once through ../shared/peers/llamacpp.sh).
#
#   scripts/bench-peers.sh                 # 3 HumanEval + 3 MT-Bench prompts, 256 new tokens
#   N=10 MAX_NEW=128 scripts/bench-peers.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

N=${N:-3}
MAX_NEW=${MAX_NEW:-256}
OUT=${OUT:-results}
peer="${AMUSD_SHARED_DIR:-../shared}/peers/llamacpp.sh"
[ -x "$peer" ] || { echo "bench-peers: no $peer (set AMUSD_SHARED_DIR)" >&2; exit 1; }

scripts/fetch-assets.sh
cargo build --release --workspace --bins
home="${AMUSD_HOME:-$HOME/.cache/amusd}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The same prompts for both programs, as {"conversation": [...]} lines.
scripts/first-turn-prompts.py "$N" "$home/datasets" > "$tmp/prompts.jsonl"

commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- . ":(exclude)$OUT" 2>/dev/null || echo ' (with local changes)')"
echo "== forward costs" >&2
scripts/bench-forward.sh f32 f32-dense stored:head=screen:kv=f16:acts=16 stored q8_0 > "$tmp/forward.txt"
echo "== amusd bench: $(wc -l < "$tmp/prompts.jsonl") prompts, $MAX_NEW new tokens" >&2
./target/release/amusd bench --dataset "$tmp/prompts.jsonl" --max-new-tokens "$MAX_NEW" \
    --output "$tmp/amusd.json"
./target/release/amusd report "$tmp/amusd.json" --markdown > "$tmp/amusd.md"
echo "== llama.cpp" >&2
"$peer" bench 3 > "$tmp/llama-bench.md"
"$peer" spec "$tmp/prompts.jsonl" "$MAX_NEW" > "$tmp/llama-spec.md"

# The instruction set decides which kernels ran: name it, as the CPU's model name may not.
isa="AVX2"
grep -qw avx512f /proc/cpuinfo && isa="AVX-512"
grep -qw avx512_vnni /proc/cpuinfo && isa="$isa with VNNI"
mkdir -p "$OUT"
{
    echo "# amusd and llama.cpp side by side"
    echo
    echo "Written by \`scripts/bench-peers.sh\` (N=$N MAX_NEW=$MAX_NEW) at commit $commit on $(date -u +%Y-%m-%d)."
    echo "Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $isa;"
    echo "$(rustc --version). Prompts: the first $N HumanEval prompts and the first $N MT-Bench questions"
    echo "(first turn), chat template applied, greedy. amusd: \`ar\` and \`sd\` on one core, \`amusd\` on"
    echo "two (one per worker); llama.cpp with 1 and 2 threads."
    echo
    echo "## amusd (\`amusd bench\`)"
    echo
    cat "$tmp/amusd.md"
    echo
    echo "## llama.cpp, AR and speculative decoding (\`llamacpp.sh spec\`)"
    echo
    cat "$tmp/llama-spec.md"
    echo
    echo "## Forward cost per weight format, one core (\`scripts/bench-forward.sh\`)"
    echo
    echo '```'
    cat "$tmp/forward.txt"
    echo '```'
    echo
    echo "## llama-bench (\`llamacpp.sh bench\`)"
    echo
    cat "$tmp/llama-bench.md"
} > "$OUT/peers.md"
echo "wrote $OUT/peers.md" >&2
