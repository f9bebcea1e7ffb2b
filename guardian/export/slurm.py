"""An sbatch script: Slurm requeues, guardian's library keeps the checkpoints exact.

How the pieces fit (each line of the script says why, too):
* ``--signal=B:USR2@LEAD`` makes Slurm signal the batch shell LEAD seconds before the
  time limit; the script forwards USR2 to the training step; the library saves at the
  next step boundary and exits 75.
* exit 75 (or a non-zero step whose fresh run.json says ``preempted``, as torchrun
  reports 1 for ranks that exited 75) → ``scontrol requeue $SLURM_JOB_ID``; anything
  else is returned to Slurm as is (78 = never retry). ``--requeue`` allows it,
  ``--open-mode=append`` keeps the log across requeues.
* multi-node or several processes per node: one ``torchrun`` per node (srun
  ``--ntasks-per-node=1``) with c10d rendezvous on the first node, ``--max-restarts=0``
  (one restart budget: Slurm's).
"""

from __future__ import annotations

from ..daemon.launch import script_args
from . import TORCHRUN_SIGNALS, Export, ExportError, check_name, check_positive, header, quote

REQUEUE_CHECK = (
    'import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get("state") == "preempted" else 1)'
)


def render(
    command: list[str],
    *,
    name: str,
    run_dir: str,
    nodes: int = 1,
    nproc_per_node: int = 1,
    signal_lead: int = 120,
    time_limit: str | None = None,
    partition: str | None = None,
    gpus_per_node: int | None = None,
    cpus_per_task: int | None = None,
    output: str | None = None,
    port: int = 29500,
    python: str = "python3",
) -> Export:
    """The sbatch script for ``command`` (``train.py ARGS`` or any executable)."""
    check_name(name)
    check_positive("--nodes", nodes)
    check_positive("--nproc-per-node", nproc_per_node)
    if not command:
        raise ExportError("no command given after --")
    if signal_lead < 10:
        raise ExportError(f"--signal-lead {signal_lead}: give the job at least 10 s to checkpoint")
    distributed = nodes > 1 or nproc_per_node > 1
    lines = _directives(name, nodes, signal_lead, time_limit, partition, gpus_per_node, cpus_per_task, output)
    lines += _environment(run_dir, python, distributed)
    lines += _step(command, distributed, nproc_per_node, signal_lead, port, python)
    lines += _epilogue()
    return Export(
        "slurm",
        f"{name}.sbatch",
        "\n".join(lines) + "\n",
        True,
        [f"sbatch {name}.sbatch", f"GUARDIAN_RUN_DIR={run_dir} must be on storage every node sees"],
    )


def _directives(name, nodes, lead, time_limit, partition, gpus, cpus, output) -> list[str]:
    lines = ["#!/bin/bash"]
    lines += [f"# {h}" for h in header("slurm", ["Exit 75 → scontrol requeue; 78 → never retried."])]
    lines += [
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR2@{lead}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={output or f'{name}-%j.out'}",
    ]
    optional = {"time": time_limit, "partition": partition, "gpus-per-node": gpus, "cpus-per-task": cpus}
    lines += [f"#SBATCH --{k}={v}" for k, v in optional.items() if v is not None]
    return lines


def _environment(run_dir: str, python: str, distributed: bool) -> list[str]:
    lines = [
        "",
        "set -u",
        "# guardian's checkpoints: shared storage, the same path on every node and every requeue",
        f"export GUARDIAN_RUN_DIR={quote([run_dir])}",
        "export GUARDIAN_ATTEMPT=$(( ${SLURM_RESTART_COUNT:-0} + 1 ))",
        f"GUARDIAN_PYTHON=${{GUARDIAN_PYTHON:-{python}}}",
        'mkdir -p "$GUARDIAN_RUN_DIR"',
        'echo "guardian: job ${SLURM_JOB_ID:-?} attempt $GUARDIAN_ATTEMPT on $(hostname)" >&2',
        "stamp=$(mktemp)  # run.json newer than this was written by this attempt",
    ]
    if distributed:
        lines += [
            "# torchrun must catch USR2 and pass it to the ranks (its default would kill it)",
            f"export TORCHELASTIC_SIGNALS_TO_HANDLE={TORCHRUN_SIGNALS}",
            'GUARDIAN_MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        ]
    return lines


def _step(command, distributed, nproc, lead, port, python) -> list[str]:
    if distributed:
        tr = [
            "-m",
            "torch.distributed.run",
            "--nnodes=$SLURM_NNODES",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=$GUARDIAN_MASTER:{port}",
            "--rdzv-id=$SLURM_JOB_ID",
            "--max-restarts=0",
            f"--shutdown-timeout={lead}",
        ]
        run = '"$GUARDIAN_PYTHON" ' + " ".join(tr) + " " + quote(script_args(list(command)))
    else:
        run = quote(list(command))
    return [
        "",
        "# Slurm signals only this shell (B:); forward USR2 to the step: checkpoint, then exit 75",
        "step_pid=",
        'forward_usr2() { echo "guardian: USR2: asking the training step to checkpoint" >&2;'
        ' [ -n "$step_pid" ] && kill -USR2 "$step_pid" 2>/dev/null; }',
        "trap forward_usr2 USR2",
        f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {run} &",
        "step_pid=$!",
        'rc=0; wait "$step_pid" || rc=$?',
        "# a trapped signal interrupts wait (rc > 128) while the step still runs: wait again",
        'while kill -0 "$step_pid" 2>/dev/null; do rc=0; wait "$step_pid" || rc=$?; done',
    ]


def _epilogue() -> list[str]:
    return [
        "",
        "preempted() {  # the library's own word, for launchers (torchrun) that exit 1",
        '  [ "$GUARDIAN_RUN_DIR/run.json" -nt "$stamp" ] &&'
        f' "$GUARDIAN_PYTHON" -c {quote([REQUEUE_CHECK])} "$GUARDIAN_RUN_DIR/run.json"',
        "}",
        'if [ "$rc" -eq 75 ] || { [ "$rc" -ne 0 ] && [ "$rc" -ne 78 ] && preempted; }; then',
        '  echo "guardian: exit $rc: checkpointed; requeueing job $SLURM_JOB_ID" >&2',
        '  rm -f "$stamp"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'rm -f "$stamp"',
        'echo "guardian: exit $rc: not requeued" >&2',
        'exit "$rc"',
    ]
