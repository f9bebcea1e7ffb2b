#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. This is what CI runs.
#
# Under CI=true as root it also starts a private single-node Slurm for the real
# requeue test (scripts/slurm-localhost.sh) and stops it afterwards; elsewhere that
# one test skips and says why.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
started_slurm=""
if [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ]; then
  if conf=$(bash scripts/slurm-localhost.sh 2>&1 | sed -n 's/^SLURM_CONF=//p') && [ -n "$conf" ]; then
    export SLURM_CONF=$conf
    started_slurm=1
  else
    echo "test.sh: could not start a local Slurm; the real-Slurm test will skip"
  fi
fi
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [ -n "$started_slurm" ]; then
  pkill -x slurmd || true
  pkill -x slurmctld || true
fi
exit $status
