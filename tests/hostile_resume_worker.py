"""Resume each run directory named on the command line with protect(), in one process.

Used by test_hostile_suite.py: importing torch once and resuming many run
directories keeps the suite fast on 2 cores. Each resume runs under its own alarm,
so a hang (a blocking open of a FIFO) is reported as "hang" for that case and the
batch goes on. Prints one JSON object per run directory:

    {"run": RUN, "outcome": "resumed"|"fresh"|"error"|"hang"|"crash", ...}

"error" is a GuardianError (a clean refusal); "crash" is anything else, with its
traceback — the suite counts those as failures.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

import torch
from torch import nn

import guardian
from guardian.errors import GuardianError

PER_RUN_SECONDS = 30


class _Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise _Hang()


def tiny():
    """The same model and optimizer as the suite's template run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def resume(run: str) -> dict:
    model, opt = tiny()
    signal.alarm(PER_RUN_SECONDS)
    try:
        with guardian.protect(
            model=model, optimizer=opt, dir=run, every_steps=None, every_epochs=None, save_on_exit=False
        ) as g:
            name = os.path.basename(g.resumed_from.rstrip("/")) if g.resumed_from else None
            return {"outcome": "resumed" if name else "fresh", "from": name, "step": g.global_step}
    except _Hang:
        return {"outcome": "hang"}
    except GuardianError as e:
        return {"outcome": "error", "type": type(e).__name__, "message": str(e)[:2000]}
    except BaseException as e:  # noqa: BLE001 - the suite reports every crash
        return {"outcome": "crash", "type": type(e).__name__, "traceback": traceback.format_exc()[-4000:]}
    finally:
        signal.alarm(0)


def main() -> None:
    signal.signal(signal.SIGALRM, _alarm)
    for run in json.loads(sys.argv[1]):
        print(json.dumps({"run": run, **resume(run)}), flush=True)


if __name__ == "__main__":
    main()
