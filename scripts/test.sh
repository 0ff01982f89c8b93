#!/usr/bin/env bash
# The test command of the README and of CI: creates .venv if needed, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
