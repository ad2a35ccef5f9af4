#!/usr/bin/env bash
# The paper's evaluation at a size that finishes in under 30 minutes on a 2-core machine: HumanEval,
# MT-Bench (both turns) and the RefactorChat stand-in through ar, sd and amusd, with the default
# model pair. Writes results/<dataset>.json, results/<dataset>.svg and results/REPORT.md.
#
#   scripts/bench.sh                      # the committed run
#   HUMANEVAL=164 MT_BENCH=80 REFACTOR=164 MAX_NEW=256 scripts/bench.sh   # the full datasets
#
# Run it on an otherwise idle machine: every strategy is timed on the same cores (each sample
# through ar, sd and amusd in turn), and anything else running skews the ratios.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

HUMANEVAL=${HUMANEVAL:-20}
MT_BENCH=${MT_BENCH:-10}
REFACTOR=${REFACTOR:-10}
MAX_NEW=${MAX_NEW:-128}
OUT=${OUT:-results}

scripts/fetch-assets.sh
cargo build --release --workspace --bins
mkdir -p "$OUT"
amusd=./target/release/amusd

# Read before the run writes its results, which would count as local changes.
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- . ":(exclude)$OUT" 2>/dev/null || echo ' (with local changes)')"
started=$(date +%s)
for spec in "humaneval:$HUMANEVAL" "mt-bench:$MT_BENCH" "refactor:$REFACTOR"; do
    dataset=${spec%%:*}
    n=${spec#*:}
    echo "== $dataset: $n samples, $MAX_NEW new tokens" >&2
    "$amusd" bench --dataset "$dataset" --num-samples "$n" --max-new-tokens "$MAX_NEW" \
        --output "$OUT/$dataset.json" --plot "$OUT/$dataset.svg"
done
elapsed=$(( $(date +%s) - started ))

{
    echo "# amusd benchmark results"
    echo
    echo "Written by \`scripts/bench.sh\` (HUMANEVAL=$HUMANEVAL MT_BENCH=$MT_BENCH REFACTOR=$REFACTOR" \
        "MAX_NEW=$MAX_NEW) in ${elapsed} s."
    echo
    echo "- commit: $commit"
    echo "- machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB"
    echo "- $(rustc --version)"
    echo "- models: verify SmolLM2-135M-Instruct in f32 arithmetic on its Q4_1 values (blocks widened in registers) on cpu:1;" \
        "draft the same checkpoint as stored (q4_1 layers, q8_0 embedding, integer kernels with 16-bit activations, value and residual, under amusd and 8-bit ones under sd; output head screened by a q4_0 copy, top 32; f16 KV cache) with prompt lookup 2-4" \
        "and the n-gram history ahead of it (the default) on cpu:0; each worker pinned and single-threaded;" \
        "ar and sd run in one process pinned to cpu:1"
    echo "- greedy decoding, $MAX_NEW new tokens at most, stop at <|im_end|>"
    echo "- every first turn prefills its whole prompt; MT-Bench's second turns keep the positions their first turn left" \
        "cached, in each strategy's own caches, and prefill the rest (the records' cached_prompt_tokens; \`--no-prompt-cache\` turns it off)"
    echo
    "$amusd" report --markdown "$OUT/humaneval.json" "$OUT/mt-bench.json" "$OUT/refactor.json"
    echo
    echo "Timelines of one sample per dataset: [humaneval](humaneval.svg), [mt-bench](mt-bench.svg)," \
        "[refactor](refactor.svg)."
} > "$OUT/REPORT.md"
cat "$OUT/REPORT.md"
