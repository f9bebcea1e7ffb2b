#!/usr/bin/env bash
# A packaging mistake must fail CI: build the wheel, install it with extras into a fresh
# venv outside the clone, and run the README's minimal loop from it — to the end, then
# SIGKILLed mid-run and resumed, with equal digests (scripts/readme_kill_resume.py).
#
# The fresh venv sees .venv's packages (--system-site-packages over .venv's interpreter
# would not; we point a .pth file at .venv's site-packages instead) so torch is not
# installed twice. guardian itself must come from the wheel: the check fails if
# `import guardian` resolves into this clone.
#
#   bash scripts/check_wheel.sh        (after scripts/setup.sh; scripts/test.sh calls it)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ -x .venv/bin/python ] || bash scripts/setup.sh demo
WORK=$(mktemp -d /tmp/guardian-wheel.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

echo "== build the wheel"
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" . >/dev/null
WHEEL=$(ls "$WORK"/dist/torch_guardian-*.whl)
echo "$(basename "$WHEEL")"

echo "== install it with an extra into a fresh venv outside the clone"
python_bin=$(.venv/bin/python -c 'import sys; print(sys.executable)')
"$python_bin" -m venv --without-pip "$WORK/venv" 2>/dev/null || "$python_bin" -m venv "$WORK/venv"
site_new=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
site_dev=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# .venv's third-party packages (torch above all) without its editable guardian: the
# editable install's .pth and finder files are left out of the path we lend.
mkdir -p "$WORK/lent"
for entry in "$site_dev"/*; do
  case "$(basename "$entry")" in
    __editable__*|torch_guardian*|guardian|_virtualenv*|distutils-precedence.pth) ;;
    *.pth) ;;
    *) ln -s "$entry" "$WORK/lent/" ;;
  esac
done
echo "$WORK/lent" > "$site_new/zz-lent-from-dev-venv.pth"
"$WORK/venv/bin/python" -m pip -q --disable-pip-version-check install --no-compile "$WHEEL[tensorboard]"

echo "== where guardian comes from"
cd "$WORK"
origin=$("$WORK/venv/bin/python" -c 'import guardian, os; print(os.path.dirname(guardian.__file__))')
echo "$origin"
case "$origin" in
  "$ROOT"/*) echo "check_wheel: guardian was imported from the clone, not the wheel" >&2; exit 1 ;;
esac
"$WORK/venv/bin/guardian" --version
"$WORK/venv/bin/python" -c 'import tensorboard' || { echo "check_wheel: the [tensorboard] extra was not installed" >&2; exit 1; }

echo "== the README's loop from the wheel: run, SIGKILL, resume, compare"
"$WORK/venv/bin/python" "$ROOT/scripts/readme_kill_resume.py" --readme "$ROOT/README.md" --python "$WORK/venv/bin/python"
