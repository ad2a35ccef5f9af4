#!/usr/bin/env bash
# The whole test suite: fetches what is missing, builds every binary (the end-to-end tests drive
# them), runs every test in release mode (model code is too slow unoptimised).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-assets.sh
cargo build --release --workspace --bins
cargo test --release --workspace "$@"
