#!/usr/bin/env bash
# Create .venv and install guardian (the torch-guardian distribution) into it, sized to
# the job. Idempotent: a second run only adds what is missing.
#
#   bash scripts/setup.sh demo   guardian and its runtime dependencies: what the demo needs
#   bash scripts/setup.sh        the test set-up: adds the test extra (pytest, hypothesis,
#                                linters, TensorBoard, matplotlib), Lightning and
#                                transformers for their integration tests; what
#                                scripts/test.sh runs
#
# Ray is installed only where its test runs: under CI=true, or when asked with
# SETUP_EXTRAS=ray (a comma-separated list of extras from pyproject.toml), so a local
# test set-up does not pull Ray, pandas and pyarrow for one test that then skips.
#
# torch is pinned to 2.13.0. On this project's machines pip finds that release's CPU
# build on local disk (no multi-GB CUDA download); anywhere else pip takes the
# standard build from PyPI (CUDA-enabled on Linux x86_64). To use another build —
# a different CUDA version, ROCm, a newer release — install torch into .venv first
# from PyTorch's own package index: an existing torch >= 2.4 is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
JOB=${1:-test}
case "$JOB" in
  demo) extras="" ;;
  test) extras="test,lightning,transformers" ;;
  *) echo "usage: bash scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac
if [ "$JOB" = test ] && [ "${CI:-}" = true ]; then extras="$extras,ray"; fi
if [ -n "${SETUP_EXTRAS:-}" ]; then extras="${extras:+$extras,}$SETUP_EXTRAS"; fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# --no-compile: byte-compiling torch's thousands of modules at install time is most of
# a fresh set-up; Python compiles the few modules a run imports on first use instead.
INSTALL=(.venv/bin/python -m pip -q --disable-pip-version-check install --no-compile)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing torch 2.13.0 into .venv"
  "${INSTALL[@]}" "torch==2.13.0"
fi
# Until 0.2 the distribution was called "guardian", a name that on PyPI belongs to an
# unrelated project; either one would shadow this tree's `import guardian`.
if .venv/bin/python -m pip show guardian >/dev/null 2>&1; then
  echo "setup: removing the distribution 'guardian' from .venv (now torch-guardian)"
  .venv/bin/python -m pip uninstall -y -q guardian
fi
echo "setup: installing torch-guardian${extras:+[$extras]} (editable) into .venv"
if [ "$JOB" = test ]; then
  # s3fs pins botocore (through aiobotocore); moto, in the test extra, needs boto3, whose
  # newest release may want a newer botocore. Pin boto3 to the botocore s3fs brought, or
  # pip walks back through every boto3 release before it finds one that fits.
  "${INSTALL[@]}" "s3fs>=2023.6"
  BOTO3="boto3==$(.venv/bin/python -c 'import botocore; print(botocore.__version__)')"
  "${INSTALL[@]}" -e ".${extras:+[$extras]}" "$BOTO3"
else
  "${INSTALL[@]}" -e ".${extras:+[$extras]}"
fi
# The power-cut tests mount a FUSE file system: they need fusermount (Debian's fuse3).
# As root on Debian/Ubuntu we install it; elsewhere those tests skip and say why.
if [ "$JOB" = test ] && [ "$(id -u)" = 0 ] && ! command -v fusermount3 >/dev/null && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null) || echo "setup: could not install fuse3; FUSE tests will skip"
fi
echo "setup: .venv ready in ${SECONDS} s"
