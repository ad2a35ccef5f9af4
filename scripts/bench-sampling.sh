#!/usr/bin/env bash
# Sampling at several temperatures: acceptance and speedup of amusd over ar, measured side by side in
# one `amusd bench` run per (dataset, temperature), and the acceptance of a greedy draft against the
# same sampling target (`--greedy-draft`, llama.cpp's scheme) on the same prompts and seed.
# Writes $OUT/<dataset>-t<T>.json, $OUT/<dataset>-t<T>-greedy-draft.json and $OUT/REPORT.md.
#
#   scripts/bench-sampling.sh                          # 20 samples, 128 tokens
#   SAMPLES=5 MAX_NEW=64 scripts/bench-sampling.sh     # a quick one
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SAMPLES=${SAMPLES:-20}
MAX_NEW=${MAX_NEW:-128}
SEED=${SEED:-1}
TEMPERATURES=${TEMPERATURES:-"0 0.3 0.7 1.0 1.5"}
DATASETS=${DATASETS:-"humaneval mt-bench"}
OUT=${OUT:-results/sampling}

commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- . ":(exclude)$OUT" 2>/dev/null || echo ' (with local changes)')"
scripts/fetch-assets.sh
cargo build --release --bin amusd
mkdir -p "$OUT"
amusd=./target/release/amusd
for dataset in $DATASETS; do
    for t in $TEMPERATURES; do
        common=(--dataset "$dataset" --num-samples "$SAMPLES" --max-new-tokens "$MAX_NEW"
            --temperature "$t" --seed "$SEED")
        echo "== $dataset, temperature $t" >&2
        "$amusd" bench "${common[@]}" --strategies ar,amusd --output "$OUT/$dataset-t$t.json"
        if [ "$t" != 0 ]; then
            "$amusd" bench "${common[@]}" --strategies amusd --greedy-draft \
                --output "$OUT/$dataset-t$t-greedy-draft.json"
        fi
    done
done
{
    echo "# Sampling: amusd against ar, and a greedy draft against the same target"
    echo
    echo "\`SAMPLES=$SAMPLES MAX_NEW=$MAX_NEW SEED=$SEED scripts/bench-sampling.sh\` at commit $commit, $(date -u +%Y-%m-%d)."
    echo
    "$amusd" report "$OUT"/*.json --markdown
} >"$OUT/REPORT.md"
cat "$OUT/REPORT.md"
