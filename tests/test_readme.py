"""The README runs as printed (issue 15).

Every fenced ``bash``/``python`` block of README.md is either run here, exactly as
printed, or carries a marker on the line before it that says why not::

    <!-- readme: skip: <reason> -->      not run (long, or needs the reader's own setup)
    <!-- readme: file train.py -->       a python block the reader saves as that file

Blocks run in README order, each in a fresh ``bash`` with the working directory a copy of
a fresh clone (the repository's tracked top-level entries linked into a temp dir, with
this clone's ``.venv`` — the state after the two commands). The README's minimal loop is
also killed with SIGKILL mid-run and resumed to equal digests
(``scripts/readme_kill_resume.py``, which scripts/check_wheel.sh runs from the wheel).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT

README = os.path.join(ROOT, "README.md")
BLOCK_RE = re.compile(
    r"(?:<!-- readme: (?P<marker>[^>]*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.S
)
RUN_TIMEOUT_S = 900  # a block trains a tiny model; generous for a loaded 2-core machine


def readme_blocks() -> list[dict[str, str]]:
    text = open(README, encoding="utf-8").read()
    return [m.groupdict() for m in BLOCK_RE.finditer(text)]


def test_every_block_is_run_or_says_why_not():
    blocks = readme_blocks()
    assert blocks, "no code blocks found in README.md"
    for b in blocks:
        assert b["lang"] in ("bash", "python"), f"block without a known language: {b['body'][:80]!r}"
        marker = b["marker"] or ""
        if marker.startswith("skip"):
            assert re.match(r"skip: \S.{10,}", marker), f"a skipped block must say why: {marker!r}"
        elif marker:
            assert re.fullmatch(r"file [\w.]+\.py", marker), f"unknown marker {marker!r}"
            assert b["lang"] == "python"
        else:
            assert b["lang"] == "bash", f"a python block needs a marker: {b['body'][:80]!r}"


def test_python_blocks_compile():
    for b in readme_blocks():
        if b["lang"] == "python":
            compile(b["body"], "README.md", "exec")


def test_local_links_exist():
    text = open(README, encoding="utf-8").read()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert os.path.exists(os.path.join(ROOT, target)), f"README links to missing {target}"


def test_install_names_the_distribution_that_is_ours():
    """`pip install guardian` is an unrelated PyPI project: the README must never say it."""
    text = open(README, encoding="utf-8").read()
    pyproject = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    assert re.search(r'^name = "torch-guardian"$', pyproject, re.M)
    for line in text.splitlines():
        if re.search(r"pip install ['\"]?guardian\b", line):
            assert "unrelated" in line, f"README installs PyPI's 'guardian': {line!r}"


def fresh_clone_view(tmp_path) -> str:
    """A directory that looks like a fresh clone after the two commands: the tracked
    top-level entries and this clone's .venv, linked, so runs/ and dist/ land in tmp."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    view = tmp_path / "clone"
    view.mkdir()
    for top in sorted({p.split("/")[0] for p in tracked} | {".venv"}):
        os.symlink(os.path.join(ROOT, top), view / top)
    return str(view)


@pytest.mark.slow
def test_readme_blocks_run_as_printed(tmp_path):
    if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "activate")):
        pytest.skip("no .venv in the clone: run bash scripts/setup.sh first")
    cwd = fresh_clone_view(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # a new shell: not this test's venv
    ran = 0
    for b in readme_blocks():
        marker = b["marker"] or ""
        if marker.startswith("skip"):
            continue
        if marker.startswith("file "):
            with open(os.path.join(cwd, marker.split()[1]), "w", encoding="utf-8") as f:
                f.write(b["body"])
            continue
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", b["body"]],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        assert proc.returncode == 0, f"README block failed:\n{b['body']}\n--- stderr:\n{proc.stderr[-3000:]}"
        ran += 1
    assert ran >= 2, "the README should have runnable shell blocks"
    assert os.path.isdir(os.path.join(cwd, "runs", "quickstart")), "the minimal loop saved nothing"
    assert any(n.startswith("torch_guardian-") for n in os.listdir(os.path.join(cwd, "dist")))


@pytest.mark.slow
def test_readme_loop_killed_resumes_to_equal_digests():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "readme_kill_resume.py"), "--readme", README],
        capture_output=True,
        text=True,
        timeout=3 * RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout
    assert re.search(r"checkpoint ([0-9a-f]{32})  ==  \1", proc.stdout)
