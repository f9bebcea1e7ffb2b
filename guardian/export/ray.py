"""A Ray Train driver: Ray restarts failed workers, guardian resumes them exactly.

The generated file builds a ``TorchTrainer`` with ``ScalingConfig``,
``FailureConfig(max_failures=K)`` and a *fixed* ``RunConfig(name, storage_path)`` (a
restarted driver finds the same run), and a ``train_loop_per_worker`` that points
``GUARDIAN_RUN_DIR`` at a fixed shared path and calls the user's function. That
function trains under ``guardian.protect(dir=os.environ["GUARDIAN_RUN_DIR"])``; on a
restart the library resumes by itself from the newest valid checkpoint. To show
guardian's checkpoints in Ray, the function calls :func:`report` (below), which hands
the newest verified checkpoint directory to ``ray.train.report``.
"""

from __future__ import annotations

import os
import re
from typing import Any

from . import Export, ExportError, check_name, check_positive, header

_ENTRY = re.compile(r"^(?P<target>[^:]+):(?P<func>[A-Za-z_]\w*)$")


def render(
    command: list[str],
    *,
    name: str,
    run_dir: str,
    storage_path: str,
    num_workers: int = 2,
    use_gpu: bool = False,
    max_failures: int = 3,
) -> Export:
    """The driver for ``command``: ``MODULE:FUNCTION`` or ``FILE.py:FUNCTION`` and its args."""
    check_name(name)
    check_positive("--num-workers", num_workers)
    if max_failures < -1:
        raise ExportError(f"--max-failures {max_failures}: expected -1 (forever) or more")
    if not command or not _ENTRY.match(command[0]):
        raise ExportError(
            f"ray: expected MODULE:FUNCTION or FILE.py:FUNCTION after --, got {command[:1]!r}; "
            "the function is called in every worker with config={'argv': [...]}"
        )
    entry = command[0]
    target, _, func = entry.rpartition(":")
    if target.endswith(".py"):
        entry = f"{os.path.abspath(target)}:{func}"  # workers do not share the driver's cwd
    values = {
        "NAME": name,
        "RUN_DIR": os.path.abspath(run_dir),
        "STORAGE_PATH": os.path.abspath(storage_path),
        "ENTRY": entry,
        "ARGV": list(command[1:]),
        "NUM_WORKERS": num_workers,
        "USE_GPU": use_gpu,
        "MAX_FAILURES": max_failures,
    }
    text = _TEMPLATE.format(
        doc="\n".join(
            header("ray", ["Run: python THIS_FILE (on the Ray head node, or with RAY_ADDRESS set)."])
        ),
        constants="\n".join(f"{k} = {v!r}" for k, v in values.items()),
    )
    return Export("ray", f"{name}_ray.py", text, False, [f"python {name}_ray.py"])


def report(metrics: dict[str, Any], run_dir: str | None = None) -> str | None:
    """Hand guardian's newest verified checkpoint to Ray Train with ``metrics``.

    Call it from the training function after a save (e.g. once per epoch). Ray copies
    the directory into its storage; guardian's own copy stays the resume source.
    Returns the checkpoint's path (None: no checkpoint yet; metrics are reported alone).
    """
    import ray.train

    from ..format import reader

    run_dir = run_dir or os.environ["GUARDIAN_RUN_DIR"]
    newest = reader.newest_valid(run_dir, verify=True) if os.path.isdir(run_dir) else None
    if newest is None:
        ray.train.report(metrics)
        return None
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(newest.path))
    return newest.path


_TEMPLATE = '''"""{doc}

Ray restarts failed workers (FailureConfig); guardian resumes them from the newest
valid checkpoint in RUN_DIR. Keep NAME and STORAGE_PATH fixed across restarts.
"""

import importlib
import importlib.util
import os
import sys

import ray.train
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

{constants}


def load_entry():
    """The user's training function, from MODULE:FUNCTION or FILE.py:FUNCTION."""
    target, func = ENTRY.rsplit(":", 1)
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location("guardian_ray_entry", target)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    return getattr(module, func)


def train_loop_per_worker(config):
    # every (re)started worker trains into the same shared guardian run directory
    os.environ["GUARDIAN_RUN_DIR"] = RUN_DIR
    load_entry()(config)


def main():
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={{"argv": ARGV}},
        scaling_config=ScalingConfig(num_workers=NUM_WORKERS, use_gpu=USE_GPU),
        run_config=RunConfig(
            name=NAME,
            storage_path=STORAGE_PATH,
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


if __name__ == "__main__":
    main()
'''
