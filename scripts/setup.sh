#!/usr/bin/env bash
# Creates .venv (if missing) and installs splitstream into it, with the extras named by the first argument
# (comma-separated; default `test`, what .ci/run needs; `none` for none, what scripts/demo.sh asks for).
# A bare machine needs nothing but python3 (>= 3.11) with its venv module (Debian/Ubuntu: python3-venv).
# pip runs only when pyproject.toml or the extras changed since the last install: .venv/.splitstream-setup
# holds the hash of pyproject.toml and the extras it was installed with.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-test}"
STAMP=.venv/.splitstream-setup

if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  # Missing, or left without pip by a failed attempt (no ensurepip): (re)create it.
  if ! "$PYTHON" -m venv --clear .venv; then
    echo "setup: '$PYTHON -m venv' failed; on Debian/Ubuntu: sudo apt-get install python3-venv" >&2
    exit 1
  fi
fi

key="$(.venv/bin/python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
installed="$(cat "$STAMP" 2>/dev/null || true)"
# Installed with these extras, or with any extras when none are asked for (a test setup runs the demo too).
if [ "$installed" = "$key $EXTRAS" ] || { [ "$EXTRAS" = none ] && [ "${installed%% *}" = "$key" ]; }; then
  exit 0
fi

spec="."
[ "$EXTRAS" = none ] || spec=".[$EXTRAS]"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e "$spec"
echo "$key $EXTRAS" > "$STAMP"
