"""A stand-in for NVML (``nvidia-ml-py``) — there is no GPU on the test machines.

Put this directory first on the daemon's PYTHONPATH. The devices are the lines of the
file named by ``FAKE_NVML_DEVICES`` (one UUID a line), re-read at every call, so a
test makes a device "fall off the bus" by rewriting the file. No process holds
memory on these devices unless ``FAKE_NVML_PROCS`` names a file of "UUID PID BYTES"
lines. Only what guardian.daemon.gpu calls is provided.
"""

from __future__ import annotations

import os


class NVMLError(Exception):
    pass


def _devices() -> list[str]:
    with open(os.environ["FAKE_NVML_DEVICES"]) as f:
        return [line.strip() for line in f if line.strip()]


def nvmlInit() -> None:
    _devices()


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(_devices())


def nvmlDeviceGetHandleByIndex(i: int) -> str:
    devices = _devices()
    if i >= len(devices):
        raise NVMLError(f"invalid device index {i}")
    return devices[i]


def nvmlDeviceGetUUID(handle: str) -> str:
    return handle


class _Proc:
    def __init__(self, pid: int, used: int) -> None:
        self.pid, self.usedGpuMemory = pid, used


def nvmlDeviceGetComputeRunningProcesses(handle: str) -> list:
    """Lines "UUID PID BYTES" of the file named by ``FAKE_NVML_PROCS`` (if any)."""
    path = os.environ.get("FAKE_NVML_PROCS")
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [line.split() for line in f if line.strip()]
    return [_Proc(int(pid), int(used)) for uuid, pid, used in rows if uuid == handle]


def nvmlDeviceGetGraphicsRunningProcesses(handle: str) -> list:
    return []
