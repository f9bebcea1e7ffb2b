"""``guardian service install``: a systemd unit that runs ``guardian watch``.

System mode (root): /etc/systemd/system/guardian.service, WantedBy=multi-user.target,
so the daemon starts at boot and reconciles (resumes jobs the power cut stopped).
User mode (--user): ~/.config/systemd/user/guardian.service, WantedBy=default.target;
``loginctl enable-linger USER`` makes it start at boot without a login.
``KillMode=process``: stopping or restarting the service must not kill the jobs — they
run in their own sessions and the next daemon adopts them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

from ..smallfiles import write_small_file_atomically

UNIT_NAME = "guardian.service"


def unit_text(home: str, user_mode: bool, executable: str | None = None) -> str:
    cmd = f"{shlex.quote(executable or guardian_executable())} watch --home {shlex.quote(home)}"
    wanted = "default.target" if user_mode else "multi-user.target"
    return f"""[Unit]
Description=guardian: supervisor for PyTorch training jobs (resumes them after crashes and reboots)
After=network-online.target local-fs.target
Wants=network-online.target

[Service]
Type=simple
ExecStart={cmd}
Environment=PYTHONUNBUFFERED=1
Restart=always
RestartSec=5
# Jobs run in their own sessions and outlive the daemon; never kill them with it.
KillMode=process
TimeoutStopSec=30

[Install]
WantedBy={wanted}
"""


def guardian_executable() -> str:
    """The ``guardian`` script of this installation (next to this Python, e.g. in a venv)."""
    beside = os.path.join(os.path.dirname(sys.executable), "guardian")
    return beside if os.access(beside, os.X_OK) else (shutil.which("guardian") or "guardian")


def unit_path(user_mode: bool, unit_dir: str | None = None) -> str:
    if unit_dir:
        return os.path.join(unit_dir, UNIT_NAME)
    if user_mode:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return os.path.join(base, "systemd", "user", UNIT_NAME)
    return os.path.join("/etc/systemd/system", UNIT_NAME)


def next_steps(user_mode: bool) -> list[str]:
    if user_mode:
        user = os.environ.get("USER", "$USER")
        return [
            "systemctl --user daemon-reload",
            "systemctl --user enable --now guardian",
            f"loginctl enable-linger {user}   # start at boot, without a login",
        ]
    return ["systemctl daemon-reload", "systemctl enable --now guardian"]


def write_unit(path: str, text: str) -> None:
    """Write the unit atomically: systemd (or a reader) never sees half of one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_small_file_atomically(path, text.encode(), mode=0o644)


def remove_unit(path: str) -> bool:
    """Delete a unit this tool wrote; False if there is none. Refuses a unit that does not
    run ``guardian watch`` (someone else's file under our name)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 16)
    except FileNotFoundError:
        return False
    if " watch" not in text or "guardian" not in text:
        raise OSError(f"{path}: does not look like a unit written by `guardian service install`; left alone")
    os.unlink(path)
    return True


def uninstall_steps(user_mode: bool) -> list[str]:
    ctl = "systemctl --user" if user_mode else "systemctl"
    return [
        f"{ctl} disable --now guardian   # stops the daemon; running jobs keep running",
        f"{ctl} daemon-reload",
    ]


def systemd_state(user_mode: bool) -> str:
    """``systemctl is-active guardian`` (active, inactive, failed...), or why it is unknown."""
    ctl = shutil.which("systemctl")
    if ctl is None:
        return "unknown (no systemctl on this machine)"
    cmd = [ctl, *(["--user"] if user_mode else []), "is-active", UNIT_NAME]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return (r.stdout.strip() or r.stderr.strip() or f"exit {r.returncode}").splitlines()[0]
