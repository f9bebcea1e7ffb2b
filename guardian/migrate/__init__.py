"""``guardian migrate``: carry checkpoints across model versions — renamed layers,
wrappers, changed tensor layouts — with the optimizer state following the weights.

    plan = guardian.migrate.plan("runs/a/step-000000120", to="mypkg.models:NetV2",
                                 rules="rename.toml")
    print(guardian.migrate.render(plan))
    guardian.migrate.apply("runs/a/step-000000120", plan, "runs/b/migrated")
    guardian.migrate.revert("runs/b/migrated", "runs/a/restored")

See docs/migrate.md for the rules format and the exit codes.
"""

from __future__ import annotations

from .api import Result, apply, load_plan, migrate, plan, revert, save_plan, signature
from .errors import (
    EXIT_BLOCKED,
    EXIT_CLEAN,
    EXIT_REJECTED,
    EXIT_VERIFY_FAILED,
    DestinationExistsError,
    InputRejectedError,
    LossyRevertError,
    MigrationError,
    PicklePayloadError,
    PlanBlockedError,
    RulesError,
    StalePlanError,
    VerificationError,
)
from .plan import Plan
from .report import render
from .report import to_json as report_json
from .rules import load_rules, parse_rules
from .targets import Target, from_module, load_target
from .verify import verify_numeric, verify_structure

__all__ = [
    "plan",
    "apply",
    "migrate",
    "revert",
    "signature",
    "save_plan",
    "load_plan",
    "render",
    "report_json",
    "load_rules",
    "parse_rules",
    "load_target",
    "from_module",
    "verify_numeric",
    "verify_structure",
    "Plan",
    "Result",
    "Target",
    "MigrationError",
    "InputRejectedError",
    "RulesError",
    "PicklePayloadError",
    "StalePlanError",
    "DestinationExistsError",
    "LossyRevertError",
    "PlanBlockedError",
    "VerificationError",
    "EXIT_CLEAN",
    "EXIT_BLOCKED",
    "EXIT_VERIFY_FAILED",
    "EXIT_REJECTED",
]
