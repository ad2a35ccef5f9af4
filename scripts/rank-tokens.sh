#!/usr/bin/env bash
# Writes amusd-model/data/smollm2-token-ranking.txt: the default model's tokens by frequency, for
# drafts that keep only the most frequent rows of their output head (`--draft-model PATH:stored:head=N`).
#
#   scripts/rank-tokens.sh
#
# The corpus is code and prose that is on every machine that builds amusd and shares nothing with
# the benchmarks: the Python 3 standard library (tests left out) and the Markdown files of the
# crates cargo fetched for this workspace. Prompts and outputs of HumanEval, MT-Bench and the
# refactor set are not in it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-assets.sh model >/dev/null
python=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
registry=${CARGO_HOME:-$HOME/.cargo}/registry/src
out=amusd-model/data/smollm2-token-ranking.txt
list=$(mktemp)
trap 'rm -f "$list" "$list.stats" "$list.body"' EXIT
{
  find "$python" -name '*.py' -not -path '*/test/*' -not -path '*/tests/*' -size -200k
  find "$registry" -name '*.md' -size -200k
} | LC_ALL=C sort >"$list"
cargo run -q --release -p amusd-model --example rank_tokens <"$list" >"$list.body" 2>"$list.stats"
{
  echo "# SmolLM2 token ranking: every token id that occurs in the corpus, most frequent first."
  echo "# Written by scripts/rank-tokens.sh on $(date -u +%F) at commit $(git rev-parse --short HEAD)."
  echo "# Corpus: $(python3 --version) standard library *.py (no tests), *.md of the crates in"
  echo "# ~/.cargo/registry; $(cat "$list.stats")."
  cat "$list.body"
} >"$out"
echo "wrote $out: $(cat "$list.stats")"
