#!/usr/bin/env bash
# Set up what the demo needs (scripts/setup.sh demo: guardian and torch, no test tools)
# and run it: train, SIGKILL, resume, prove exactness. The demo prints the time from
# this script's start to its PASS, set-up included.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_STARTED_AT=$(date +%s.%N)
export DEMO_STARTED_AT
bash scripts/setup.sh demo
exec .venv/bin/python scripts/demo.py "$@"
