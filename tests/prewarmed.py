"""A process that imports torch once and forks fresh training processes on request.

Tests that signal a job dozens of times would otherwise pay torch's import for every
process (seconds on a loaded 2-core machine). Each child is a real process in its own
session (its own process group, like a job under Slurm), runs the job module's
``main`` at top level and leaves through the normal interpreter exit — atexit,
non-daemon threads, DataLoader shutdown — with the exit code the job chose.

Protocol on stdin/stdout, one line each: the test writes ``ARGV_JSON``; the launcher
answers ``pid <pid>`` and, when that child has ended, ``exit <code>`` (a negative
code: killed by that signal). EOF on stdin ends the launcher.

    python tests/prewarmed.py MODULE    (MODULE.main() reads sys.argv[1:])
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import torch  # noqa: F401 - imported before the fork: the point of this launcher


def serve(module_name: str) -> list[str] | None:
    """Fork one child per request; returns the child's argv in the child, None in the
    launcher once stdin is closed."""
    importlib.import_module(module_name)  # its imports too, before any fork
    for line in sys.stdin:
        argv = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            os.close(devnull)
            return argv
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)
    return None


if __name__ == "__main__":
    name = sys.argv[1]
    child_argv = serve(name)
    if child_argv is not None:
        sys.argv = [name, *child_argv]
        importlib.import_module(name).main()
