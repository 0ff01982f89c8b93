#!/usr/bin/env bash
# The main job of the README: creates .venv if needed, then runs the local demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
if .venv/bin/d3 --help | grep -q " demo "; then
  exec .venv/bin/d3 demo "$@"
fi
# Until the three-tier runtime lands, the demo shows the graph and an exact three-way split.
.venv/bin/d3 graph resnet50
exec .venv/bin/d3 verify resnet50 --cuts 20,120
