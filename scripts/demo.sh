#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main demo: train, SIGKILL, resume, prove exactness.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
