"""What the job commands check before they touch the state directory.

``guardian run`` refuses, at once and with the reason, what the daemon could only
hold or queue forever: more GPUs than the machine has, a command that does not exist,
a webhook that is not an http(s) URL. Kept apart from the click layer so the rules
read (and are tested) on their own.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse

from . import DaemonError
from . import registry as reg
from .devices import INVENTORY_FILE, Inventory, discover
from .gpu import Gpus
from .knobs import load as load_knobs
from .safefiles import BadFileError


def known_inventory(h: reg.Home) -> Inventory:
    """The daemon's published inventory, else what this process can discover itself."""
    try:
        rec = reg.read_json(h.path(INVENTORY_FILE))
    except BadFileError:
        rec = None
    if rec and isinstance(rec.get("devices"), list):
        return Inventory([str(d) for d in rec["devices"]], str(rec.get("source", "daemon")))
    gpus = Gpus().start()
    try:
        return discover(gpus, load_knobs())
    finally:
        gpus.stop()


def check_gpus_fit(h: reg.Home, wanted: int) -> None:
    inv = known_inventory(h)
    if wanted > len(inv.devices):
        have = f"{len(inv.devices)} ({', '.join(inv.devices)})" if inv.devices else "none"
        raise DaemonError(
            f"--gpus {wanted}: this machine's GPU inventory ({inv.source}) has {have}; "
            "the job could never start. Ask for fewer, or configure the inventory (guardian watch --devices)"
        )


def check_command(argv: list[str], cwd: str) -> None:
    """Refuse a command that cannot be found now: the daemon would only hold it later."""
    exe = argv[0]
    found = shutil.which(exe) if os.sep not in exe else exe
    if found is not None and os.sep in exe and not os.path.isabs(exe):
        found = os.path.join(cwd, exe)
    if found is None or not os.path.isfile(found):
        raise DaemonError(f"{exe}: command not found (PATH of this shell, cwd {cwd}); check the spelling")
    if not os.access(found, os.X_OK):
        raise DaemonError(f"{found}: not executable; chmod +x it or run it through its interpreter")


def check_webhook(url: str | None) -> str | None:
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DaemonError(f"--webhook {url!r}: expected an http:// or https:// URL")
    return url
