"""guardian's exceptions and the process exit codes that go with them.

Every error says what happened, names the path or key involved, and what to do
next. Each subclass also inherits the nearest builtin so callers that already
catch ``ValueError``/``OSError``/``RuntimeError`` keep working.

Exit codes are defined once here; the CLI and the daemon both use them.
"""

from __future__ import annotations

# Process exit codes (the contract with the supervisor, Slurm and users' scripts).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INVALID = 3  # `guardian verify`: at least one checkpoint failed verification
EXIT_NOT_FOUND = 4  # no checkpoint where one was expected
# `guardian migrate`: blocked by something unresolved / output failed verification / input refused
EXIT_MIGRATE_BLOCKED = 10
EXIT_MIGRATE_VERIFY_FAILED = 11
EXIT_MIGRATE_REJECTED = 12
EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpointed on request; restart me (no crash budget used)
EXIT_NEVER_RETRY = 78  # EX_CONFIG: a permanent error; a supervisor must not restart


class GuardianError(Exception):
    """Root of every error guardian raises on purpose."""

    exit_code = EXIT_FAILURE


class CheckpointNotFoundError(GuardianError, FileNotFoundError):
    """No checkpoint exists where one was asked for."""

    exit_code = EXIT_NOT_FOUND


class CorruptCheckpointError(GuardianError, ValueError):
    """A checkpoint's bytes do not match its manifest, or do not parse.

    ``problems`` lists one human-readable line per bad file.
    """

    exit_code = EXIT_INVALID

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class UnsafeCheckpointError(CorruptCheckpointError):
    """A checkpoint tried something hostile (path traversal, pickle, absurd sizes)."""


class FormatVersionError(GuardianError, ValueError):
    """A checkpoint was written by a newer guardian with a format we cannot read."""

    exit_code = EXIT_INVALID


class UnsupportedStateError(GuardianError, TypeError):
    """A value in the training state cannot be stored without pickle.

    ``key_path`` names where in the state the value sits.
    """

    def __init__(self, message: str, key_path: str = "") -> None:
        super().__init__(message)
        self.key_path = key_path


class StateMismatchError(GuardianError, ValueError):
    """A checkpoint does not fit the live objects (missing keys, wrong shapes)."""


class NothingToProtectError(GuardianError, ValueError):
    """``protect()`` found no model, optimizer or other state in what it was given."""


class RunLockedError(GuardianError, RuntimeError):
    """Another live process is already training into the same checkpoint directory."""


class CheckpointWriteError(GuardianError, OSError):
    """Writing a checkpoint failed (disk full, permissions, I/O error).

    The previous checkpoints are untouched; the failed attempt left no files behind.
    """

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        if errno_ is not None:
            self.errno = errno_


class MetricError(GuardianError, ValueError):
    """A metric handed to guardian is not a number."""


class RemoteStoreError(GuardianError, OSError):
    """The remote tier (``replicate_to=``) cannot be used: a bucket that does not exist,
    denied writes, an endpoint that does not answer, or fsspec's backend missing."""
