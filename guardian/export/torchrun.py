"""A wrapper script for multi-node torchrun: the elastic agent restarts, guardian resumes.

Run the same script on every node. c10d rendezvous (no etcd) on ``HOST:PORT``;
``--nnodes=MIN:MAX`` lets the job continue when nodes come and go;
``--max-restarts=K`` is the only restart budget (do not also supervise it with
``guardian watch``). Each restart re-runs the script, which resumes from the newest
checkpoint every rank completed.
"""

from __future__ import annotations

from ..daemon.launch import script_args
from . import TORCHRUN_SIGNALS, Export, ExportError, check_name, check_positive, header, quote


def render(
    command: list[str],
    *,
    name: str,
    run_dir: str,
    endpoint: str,
    nnodes: str = "1",
    nproc_per_node: int = 1,
    max_restarts: int = 3,
    python: str = "python3",
) -> Export:
    """The per-node launcher script for ``command``."""
    check_name(name)
    check_positive("--nproc-per-node", nproc_per_node)
    _check_nnodes(nnodes)
    _check_endpoint(endpoint)
    if max_restarts < 0:
        raise ExportError(f"--max-restarts {max_restarts}: expected 0 or more")
    if not command:
        raise ExportError("no command given after --")
    argv = [
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={name}",
        f"--max-restarts={max_restarts}",
        *script_args(list(command)),
    ]
    lines = ["#!/bin/bash"]
    lines += [f"# {h}" for h in header("torchrun", ["Run this same script on every node."])]
    lines += [
        "set -eu",
        "# guardian's checkpoints: shared storage, the same path on every node",
        f"export GUARDIAN_RUN_DIR={quote([run_dir])}",
        "# torchrun passes these on to the ranks instead of dying and orphaning them",
        f"export TORCHELASTIC_SIGNALS_TO_HANDLE={TORCHRUN_SIGNALS}",
        'mkdir -p "$GUARDIAN_RUN_DIR"',
        f'exec "${{GUARDIAN_PYTHON:-{python}}}" {quote(argv)}',
    ]
    usage = [f"on each node: bash {name}.torchrun.sh", f"rendezvous endpoint {endpoint} must be reachable"]
    return Export("torchrun", f"{name}.torchrun.sh", "\n".join(lines) + "\n", True, usage)


def _check_nnodes(nnodes: str) -> None:
    parts = nnodes.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError as e:
        raise ExportError(f"--nnodes {nnodes!r}: expected N or MIN:MAX") from e
    if len(values) > 2 or min(values) < 1 or values != sorted(values):
        raise ExportError(f"--nnodes {nnodes!r}: expected N or MIN:MAX with 1 <= MIN <= MAX")


def _check_endpoint(endpoint: str) -> None:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ExportError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT")
