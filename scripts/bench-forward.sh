#!/usr/bin/env bash
# Cost of one forward pass per weight format, single-threaded on one core: ms/token at a 200-token
# context and the cost of a k-token forward relative to k=1 (what speculative verification pays).
#
#   scripts/bench-forward.sh                 # f32 f16 bf16 q8_0 q4_0 q4_1
#   CORE=0 scripts/bench-forward.sh q8_0     # one format, another core
#
# Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-assets.sh model
export RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1
exec taskset -c "${CORE:-1}" cargo bench -q -p amusd-model --bench forward -- "$@"
