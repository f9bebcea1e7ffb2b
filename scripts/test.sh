#!/usr/bin/env bash
# Set up (scripts/setup.sh), check the code's standing rules, and run the whole test
# suite: the timing-sensitive tests (daemon, distributed) with two CPU-bound processes
# beside them, as on a busy training server, the rest on two workers. This is what CI runs.
#
# Under CI=true as root it also starts a private single-node Slurm for the real
# requeue test (scripts/slurm-localhost.sh) and stops it afterwards; elsewhere that
# one test skips and says why. Extra arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python

echo "== lint: ruff, import contracts, types"
$PY -m ruff check guardian tests scripts
$PY -m ruff format --check guardian tests scripts
.venv/bin/lint-imports
$PY -m mypy guardian

echo "== the wheel: build, install into a fresh venv, run the README's loop killed and resumed"
bash scripts/check_wheel.sh

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
# The tests whose decisions rest on time (hang limits, restarts, a torchrun group's
# exit) run only beside two CPU-bound hogs, as on a busy training server: once, in
# the stricter condition, rather than quiet and then loaded.
LOADED=(tests/test_daemon_hostile.py tests/test_daemon_integration.py tests/test_daemon_nproc.py
  tests/test_heartbeat.py
  "tests/test_distributed.py::test_guardian_run_restarts_the_group_and_every_rank_ends_bit_exact")
skip_loaded=()
for t in "${LOADED[@]}"; do
  case "$t" in *::*) skip_loaded+=(--deselect "$t") ;; *) skip_loaded+=(--ignore "$t") ;; esac
done

echo "== the test suite (two workers, one test file per worker at a time, longest first)"
# Most tests wait on real processes, signals and fsync, so two workers on two cores
# nearly halve the wall time; tests/conftest.py orders the files longest first.
$PY -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "${skip_loaded[@]}" "$@" || status=$?

echo "== the timing-sensitive tests, beside two CPU hogs"
$PY scripts/cpuhog.py 2 &
hogs=$!
$PY -m pytest -q -p no:cacheprovider "${LOADED[@]}" || status=$?
kill "$hogs" 2>/dev/null || true
wait "$hogs" 2>/dev/null || true
if [ -n "$started_slurm" ]; then
  pkill -x slurmd || true
  pkill -x slurmctld || true
fi
exit $status
