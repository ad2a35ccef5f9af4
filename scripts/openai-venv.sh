#!/usr/bin/env bash
# A virtual environment under target/ with the official `openai` Python client and the Prometheus
# text parser, pinned, for tests/openai_client.py. Prints the venv's python. Fails (never skips) when
# python3 or its venv module is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OPENAI_VERSION=3.51.0
PROMETHEUS_CLIENT_VERSION=0.26.0
venv=target/openai-venv
stamp="$venv/.installed-openai-$OPENAI_VERSION-prometheus-$PROMETHEUS_CLIENT_VERSION"
command -v python3 >/dev/null || { echo "openai-venv: python3 is missing; install it (the openai client tests need it)" >&2; exit 1; }
if [ ! -e "$stamp" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || { echo "openai-venv: python3 -m venv failed; install python3-venv" >&2; exit 1; }
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "openai==$OPENAI_VERSION" "prometheus-client==$PROMETHEUS_CLIENT_VERSION" >&2
    touch "$stamp"
fi
echo "$PWD/$venv/bin/python"
