#!/usr/bin/env bash
# Prompt-lookup drafting (issue 13), measured: on the RefactorChat stand-in, HumanEval and MT-Bench,
# sd and amusd with the model draft alone, with prompt lookup alone (--draft-model lookup) and with
# both (the default), beside ar; then llama.cpp's n-gram speculation (ngram-simple, ngram-mod) and
# AR on the same first-turn prompts, if ../shared/peers/llamacpp.sh has built it. The model draft
# and the combined one run in one bench (--compare-lookup): each sample goes through ar, then sd
# and amusd with each drafter, so the machine's drift cannot favour either; the lookup alone needs
# workers of its own and runs in a second bench, beside its own ar.
# Writes $OUT/<dataset>-<drafters>.json, $OUT/llamacpp.md and $OUT/REPORT.md.
#
#   scripts/bench-lookup.sh                                  # 20 samples, 256 tokens (~1.5 h idle)
#   SAMPLES=5 MAX_NEW=128 DATASETS=refactor scripts/bench-lookup.sh    # a quick look
#
# Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SAMPLES=${SAMPLES:-20}
MAX_NEW=${MAX_NEW:-256}
DATASETS=${DATASETS:-refactor humaneval mt-bench}
DRAFTERS=${DRAFTERS:-model lookup combined}
OUT=${OUT:-results/lookup}
peer="${AMUSD_SHARED_DIR:-../shared}/peers/llamacpp.sh"

scripts/fetch-assets.sh
cargo build --release --workspace --bins
mkdir -p "$OUT"
amusd=./target/release/amusd
home="${AMUSD_HOME:-$HOME/.cache/amusd}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- . ":(exclude)$OUT" 2>/dev/null || echo ' (with local changes)')"
started=$(date +%s)
files=()
for drafter in $DRAFTERS; do
    case "$drafter" in
        model | lookup | combined) ;;
        *) echo "bench-lookup: unknown drafter $drafter (model, lookup, combined)" >&2; exit 2 ;;
    esac
done
# The model draft and the combined one side by side in one run where both are asked for.
both=0
[[ " $DRAFTERS " == *" model "* && " $DRAFTERS " == *" combined "* ]] && both=1
runs=()
for drafter in $DRAFTERS; do
    if [ "$both" = 1 ] && [ "$drafter" = model ]; then continue; fi
    if [ "$both" = 1 ] && [ "$drafter" = combined ]; then drafter=model+combined; fi
    runs+=("$drafter")
done
for dataset in $DATASETS; do
    for drafter in "${runs[@]}"; do
        case "$drafter" in
            model) flags=(--no-draft-lookup) ;;
            lookup) flags=(--draft-model lookup) ;;
            combined) flags=(--draft-lookup) ;;
            model+combined) flags=(--draft-lookup --compare-lookup) ;;
        esac
        echo "== $dataset, $drafter draft: $SAMPLES samples, $MAX_NEW new tokens" >&2
        "$amusd" bench --dataset "$dataset" --num-samples "$SAMPLES" --max-new-tokens "$MAX_NEW" \
            --strategies ar,sd,amusd "${flags[@]}" --output "$OUT/$dataset-$drafter.json"
        files+=("$OUT/$dataset-$drafter.json")
    done
done

# llama.cpp on the same first-turn prompts (MT-Bench's second turn needs its own first answer,
# which llama.cpp's one-shot tools do not chain; the refactor stand-in is rebuilt as amusd builds it).
llama=""
if [ -x "$peer" ] && bin="$("$peer" bin 2>/dev/null)"; then
    llama="$bin"
fi
if [ -n "$llama" ]; then
    echo "== llama.cpp: AR, ngram-simple, ngram-mod" >&2
    python3 - "$SAMPLES" "$home/datasets" "$DATASETS" "$tmp" <<'PY'
import gzip, json, sys
n, root, datasets, out = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(), sys.argv[4]
system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
he = [json.loads(l) for l in gzip.open(f"{root}/HumanEval.jsonl.gz", "rt") if l.strip()]
asks = ["Rename the variables to be more descriptive.", "Add type hints and a docstring.",
        "Extract a helper function.",
        "Rewrite the loops as comprehensions where that keeps the code readable.",
        "Add input validation that raises ValueError on bad arguments.",
        "Add a short comment before each step explaining what it does."]
def conversations(name):
    if name == "humaneval":
        for p in he[:n]:
            yield [("user", "Complete the following Python function:\n```python\n" + p["prompt"] + "```")]
    elif name == "mt-bench":
        for l in list(open(f"{root}/mt_bench/question.jsonl"))[:n]:
            yield [("user", json.loads(l)["turns"][0])]
    elif name == "refactor":
        # As coordinator/src/bench.rs builds the stand-in.
        for i, t in enumerate(he[:n]):
            code = t["prompt"] + t["canonical_solution"]
            a = [asks[(i + k) % len(asks)] for k in range(1 + i % 3)]
            conv = [("user", f"Here is a Python function:\n\n```python\n{code}```\n\n{a[0]}")]
            for ask in a[1:]:
                conv += [("assistant", f"Here is the updated function:\n\n```python\n{code}```"), ("user", ask)]
            yield conv
for name in datasets:
    for i, conv in enumerate(conversations(name)):
        text = f"<|im_start|>system\n{system}<|im_end|>\n"
        for role, content in conv:
            text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
        open(f"{out}/{name}.{i:04d}.txt", "w").write(text + "<|im_start|>assistant\n")
PY
    models="${AMUSD_PEERS:-$HOME/.cache/amusd-peers}/models"
    {
        echo "| dataset | mode | prompts | tokens | decode tok/s (sum tokens / sum time) | accept |"
        echo "|---|---|---:|---:|---:|---:|"
        for dataset in $DATASETS; do
            for mode in ar ngram-simple ngram-mod; do
                toks=0; secs=0; dr=0; acc=0; k=0
                for f in "$tmp/$dataset".*.txt; do
                    k=$((k + 1))
                    common=(-m "$models/F32.gguf" -t 1 -tb 1 --temp 0 -n "$MAX_NEW" -c 4096 --seed 42 -f "$f")
                    if [ "$mode" = ar ]; then
                        taskset -c 1 "$llama/llama-completion" "${common[@]}" --no-warmup -no-cnv --no-display-prompt >/dev/null 2>"$tmp/log"
                        read -r ms n < <(grep -E ' eval time = .* runs' "$tmp/log" | grep -v prompt | sed -E 's/.*= +([0-9.]+) ms \/ +([0-9]+) runs.*/\1 \2/')
                        secs=$(python3 -c "print($secs + $ms / 1000)"); toks=$((toks + n))
                    else
                        taskset -c 1 "$llama/llama-speculative-simple" "${common[@]}" --spec-type "$mode" >/dev/null 2>"$tmp/log"
                        read -r n s < <(grep -E 'decoded +[0-9]+ tokens in' "$tmp/log" | sed -E 's/.*decoded +([0-9]+) tokens in +([0-9.]+) seconds.*/\1 \2/')
                        secs=$(python3 -c "print($secs + $s)"); toks=$((toks + n))
                        dr=$((dr + $(grep -E 'n_drafted *=' "$tmp/log" | tail -1 | sed -E 's/.*= *([0-9]+).*/\1/')))
                        acc=$((acc + $(grep -E 'n_accept *=' "$tmp/log" | tail -1 | sed -E 's/.*= *([0-9]+).*/\1/')))
                    fi
                done
                rate=$(python3 -c "print(f'{$toks / max($secs, 1e-9):.1f}')")
                ap='—'; [ "$mode" != ar ] && ap=$(python3 -c "print(f'{100 * $acc / max($dr, 1):.1f}%')")
                echo "| $dataset | $mode | $k | $toks | $rate | $ap |"
            done
        done
    } > "$OUT/llamacpp.md"
else
    echo "bench-lookup: llama.cpp is not built ($peer bin failed); skipping it" >&2
fi
elapsed=$(( $(date +%s) - started ))

{
    echo "# Prompt-lookup drafting"
    echo
    echo "Written by \`scripts/bench-lookup.sh\` (SAMPLES=$SAMPLES MAX_NEW=$MAX_NEW DATASETS=\"$DATASETS\")" \
        "in ${elapsed} s on $(date -u +%Y-%m-%d)."
    echo
    echo "- commit: $commit"
    echo "- machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores;" \
        "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- $(rustc --version)"
    echo "- drafters: \`model\` (the default draft model without lookup), \`lookup 2-4\` (\`--draft-model lookup\`, no model)," \
        "\`model+lookup 2-4\` (the default, \`--draft-lookup\`); the model draft and the combined one run sample by sample" \
        "in one bench (\`--compare-lookup\`, one ar beside both), the lookup alone in a bench of its own; greedy"
    echo
    "$amusd" report --markdown "${files[@]}"
    compared=("$OUT"/*-model+combined.json)
    if [ -f "${compared[0]}" ]; then
        echo
        echo "## The combined draft against the model draft, sample by sample"
        echo
        python3 - "${compared[@]}" <<'PY'
import json, math, sys
print("| dataset | strategy | generations | model ms/token | combined ms/token | ratio of means | per-generation ratio: geometric mean (min-max) |")
print("|---|---|---:|---:|---:|---:|---:|")
for path in sys.argv[1:]:
    recs = json.load(open(path))
    for strategy in ("sd", "amusd"):
        ms = {}
        for r in recs:
            d = r["metrics"]["decode_ms_per_token"]
            if r["strategy"] == strategy and d:
                ms.setdefault(r["drafter"] == "model", {})[(r["sample_index"], r["turn"])] = d
        model, combined = ms.get(True, {}), ms.get(False, {})
        keys = sorted(model.keys() & combined.keys())
        if not keys:
            continue
        ratios = [model[k] / combined[k] for k in keys]
        mm = sum(model[k] for k in keys) / len(keys)
        mc = sum(combined[k] for k in keys) / len(keys)
        gm = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"| {recs[0]['dataset']} | {strategy} | {len(keys)} | {mm:.1f} | {mc:.1f} | {mm / mc:.2f}x | {gm:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")
PY
        echo
        echo "ratio: the model draft's decode ms/token over the combined draft's (above 1: the lookup made it faster)," \
            "each pair run back to back on the same sample."
    fi
    if [ -f "$OUT/llamacpp.md" ]; then
        echo
        echo "## llama.cpp n-gram speculation (first turns, 1 thread on cpu:1, F32 target)"
        echo
        cat "$OUT/llamacpp.md"
    fi
} > "$OUT/REPORT.md"
cat "$OUT/REPORT.md"
