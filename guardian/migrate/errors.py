"""Migration errors and the exit codes of ``guardian migrate``.

The four outcomes a script must tell apart each get one exit code: the migration
is clean, it is blocked by something unresolved (the report says what), the
written output failed verification, or an input was refused before any work
(bad rules, a pickle, hostile keys, a stale plan, an existing destination).

The codes are defined with all of guardian's exit codes in ``guardian/errors.py``.
"""

from __future__ import annotations

from typing import Any

from ..errors import EXIT_MIGRATE_BLOCKED as EXIT_BLOCKED
from ..errors import EXIT_MIGRATE_REJECTED as EXIT_REJECTED
from ..errors import EXIT_MIGRATE_VERIFY_FAILED as EXIT_VERIFY_FAILED
from ..errors import EXIT_OK, GuardianError

EXIT_CLEAN = EXIT_OK


class MigrationError(GuardianError):
    """Root of the errors ``guardian migrate`` raises."""

    exit_code = EXIT_REJECTED


class InputRejectedError(MigrationError, ValueError):
    """A source, target, rules file, plan or destination was refused before any work."""

    exit_code = EXIT_REJECTED


class RulesError(InputRejectedError):
    """The rules file does not parse or a rule is malformed (names the rule)."""


class PicklePayloadError(InputRejectedError):
    """A file holds arbitrary Python objects; guardian never fully unpickles."""


class StalePlanError(InputRejectedError):
    """A plan was made for different source bytes than the ones it is applied to."""


class DestinationExistsError(InputRejectedError, FileExistsError):
    """The output path exists and ``force`` was not given."""


class LossyRevertError(InputRejectedError):
    """The plan lost information, so revert cannot restore the original exactly."""


class PlanBlockedError(MigrationError, ValueError):
    """Something is unresolved (missing/unexpected keys, mismatches, dead rules…).

    ``plan`` carries the full plan so callers can print its report.
    """

    exit_code = EXIT_BLOCKED

    def __init__(self, message: str, plan: Any = None) -> None:
        super().__init__(message)
        self.plan = plan


class VerificationError(MigrationError, RuntimeError):
    """The written output does not load into the target, or its outputs differ."""

    exit_code = EXIT_VERIFY_FAILED
