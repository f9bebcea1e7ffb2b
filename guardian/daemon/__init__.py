"""``guardian watch``: the single-node supervisor. Never imports torch.

The contract between the daemon and a training process (the library implements
the job side; anything else that honours it can be supervised too):

Exit codes (``guardian.errors``)
    0   done — but only if RUN/run.json also says ``finished``; exit 0 without that
        marker is *reported* (state ``incomplete``) and never restarted.
    75  ``EXIT_REQUEUE``: checkpointed on request; restarted at once, no crash budget used.
    78  ``EXIT_NEVER_RETRY``: permanent; never restarted.
    any other code or a signal → the classifier (``policy.py``).

Files the job writes (``guardian.runfiles``)
    RUN/heartbeat.json  ``{pid, step, epoch, phase, time, step_interval_p99}``, atomic;
                        optional ``steps_total`` / ``epochs_total`` (the loop's length)
                        let ``guardian status``/``top`` show progress and an ETA.
    RUN/run.json        ``{state: running|finished|preempted|failed, error: {type, message}}``.

Signals the daemon sends to the training process (the shim's child, not the tree)
    SIGUSR2  "checkpoint at the next step boundary and exit 75" (``guardian stop``).
             SIGUSR2 rather than SIGUSR1 because NCCL may catch SIGUSR1 (submitit's lesson).
    SIGTTIN  "dump all Python stacks to stderr": the library registers
             ``faulthandler.register(signal.SIGTTIN, all_threads=True, chain=False)``.
             The daemon sends it only when /proc/PID/status shows SIGTTIN is caught
             (its default action would *stop* the process), and also runs
             ``py-spy dump`` when py-spy is installed. Output lands in the attempt's
             stderr log. Sent only before killing a hung job.
    SIGTERM, then SIGKILL to the whole process group and session (DataLoader workers).

Environment given to every attempt
    GUARDIAN_RUN_DIR      the run (checkpoint) directory registered with ``--dir``.
    GUARDIAN_ATTEMPT      the attempt number (1-based), recorded in the manifest.
    GUARDIAN_RESUME_FROM  set only when the daemon overrides the library's own choice
                          (stepping back past a checkpoint that killed two attempts).
    GUARDIAN_JOB          the job's name.
    CUDA_VISIBLE_DEVICES  the devices allocated to it (``guardian run --gpus N``; "" with
                          ``--cpu-only``; left as registered otherwise).

Process layout: each attempt runs under ``guardian.daemon.shim`` started in its own
session (setsid). The shim holds the log files, starts the command in its own process
group, waits for it and writes ``exit.json``; so the daemon can die, restart and adopt
the attempt without ever losing its exit status, and no signal aimed at the daemon
reaches training.
"""

from __future__ import annotations

from ..errors import GuardianError


class DaemonError(GuardianError, RuntimeError):
    """The supervisor cannot do what was asked (state dir unsafe, job unknown, ...)."""


class UnsafeJobError(DaemonError, PermissionError):
    """A job definition could have been written by someone other than the daemon's owner."""


__all__ = ["DaemonError", "UnsafeJobError"]
