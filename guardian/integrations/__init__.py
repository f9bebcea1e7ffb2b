"""guardian inside other people's training loops.

Each module imports its framework on first use only, so ``import guardian`` never
imports Lightning or Transformers; a missing framework is an ``ImportError`` that
names the ``pip install`` that fixes it.

* ``guardian.integrations.lightning.GuardianCallback`` — one object in ``Trainer(callbacks=[…])``.
* ``guardian.integrations.transformers.GuardianCallback`` — one object in HF's
  ``Trainer(callbacks=[…])``.
"""

from __future__ import annotations


def missing(framework: str, extra: str, package: str, error: ImportError) -> ImportError:
    """The ImportError an integration raises when its framework is not installed."""
    return ImportError(
        f"guardian's {framework} integration needs {package}, which is not installed here "
        f"({error}). Fix: pip install 'torch-guardian[{extra}]'  (or: pip install {package})"
    )
