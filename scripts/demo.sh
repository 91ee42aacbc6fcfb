#!/usr/bin/env bash
# One command for the demo on a bare machine: installs into .venv, then runs two simulated runtimes and
# the proxy on rules/ (embedded store, no Redis needed). Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/splitstream demo "$@"
