#!/usr/bin/env bash
# Creates .venv (if missing) and installs splitstream with its test dependencies into it.
# Used by scripts/demo.sh and .ci/run, so a bare machine needs nothing but python3 (>= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
