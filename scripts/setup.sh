#!/usr/bin/env bash
# Create .venv and install guardian with its test dependencies. Idempotent.
#
# torch is pinned to 2.13.0. On this project's machines pip finds that release's CPU
# build on local disk (no multi-GB CUDA download); anywhere else pip takes the
# standard build from PyPI (CUDA-enabled on Linux x86_64). To use another build —
# a different CUDA version, ROCm, a newer release — install torch into .venv first
# from PyTorch's own package index: an existing torch >= 2.4 is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "torch==2.13.0"
fi
# s3fs pins botocore (through aiobotocore); moto, in the test extra, needs boto3, whose newest
# release may want a newer botocore. Pin boto3 to the botocore s3fs brought, or pip walks
# back through every boto3 release before it finds one that fits.
"${PIP[@]}" install "s3fs>=2023.6"
BOTO3="boto3==$(.venv/bin/python -c 'import botocore; print(botocore.__version__)')"
"${PIP[@]}" install -e ".[test,ray,lightning]" "$BOTO3"   # ray: the Ray Train hand-off test; lightning: its integration tests
# The power-cut tests mount a FUSE file system: they need fusermount (Debian's fuse3).
# As root on Debian/Ubuntu we install it; elsewhere those tests skip and say why.
if [ "$(id -u)" = 0 ] && ! command -v fusermount3 >/dev/null && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq fuse3 >/dev/null) || echo "setup: could not install fuse3; FUSE tests will skip"
fi
