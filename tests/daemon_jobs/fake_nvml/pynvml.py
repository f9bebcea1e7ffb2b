"""A stand-in for NVML (``nvidia-ml-py``) — there is no GPU on the test machines.

Put this directory first on the daemon's PYTHONPATH. The devices are the lines of the
file named by ``FAKE_NVML_DEVICES`` (one UUID a line), re-read at every call, so a
test makes a device "fall off the bus" by rewriting the file. No process ever holds
memory on these devices. Only what guardian.daemon.gpu calls is provided.
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


def nvmlDeviceGetComputeRunningProcesses(handle: str) -> list:
    return []


def nvmlDeviceGetGraphicsRunningProcesses(handle: str) -> list:
    return []
