#!/usr/bin/env bash
# One command for the demo on a bare machine: installs into .venv (the first time, or after pyproject.toml
# changed; no test dependencies), then runs two simulated runtimes and the proxy on rules/ (embedded store,
# no Redis needed). Arguments go to `splitstream demo` (--port 8080, --backend-ports 9101,9102). Ctrl-C stops
# everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh none
exec .venv/bin/splitstream demo "$@"
