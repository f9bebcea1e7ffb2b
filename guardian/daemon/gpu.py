"""GPU facts from NVML (``nvidia-ml-py``, imported as ``pynvml``), optional.

Without the package, a driver or a GPU every function answers "nothing known" and
the daemon carries on: GPU awareness refines decisions, it never blocks a CPU job.
``nvidia-smi`` is never parsed. Never imports torch (no CUDA context in the daemon).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psutil

log = logging.getLogger(__name__)

XID_EVENT_NAMES = (
    "nvmlEventTypeXidCriticalError",
    "nvmlEventTypeDoubleBitEccError",
    "nvmlEventTypeSingleBitEccError",
)


class Gpus:
    """A lazily initialised NVML session. ``available`` is False when NVML is absent."""

    def __init__(self) -> None:
        self.nvml: Any = None
        self.why_not = ""
        self._events: Any = None

    def start(self) -> Gpus:
        try:
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            self.nvml = pynvml
            self._register_events()
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded...
            self.nvml, self.why_not = None, f"NVML unavailable ({type(e).__name__}: {e}); GPU checks off"
            log.info("%s", self.why_not)
        return self

    @property
    def available(self) -> bool:
        return self.nvml is not None

    def _handles(self) -> list[Any]:
        n = self.nvml.nvmlDeviceGetCount()
        return [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]

    def _uuid(self, handle: Any) -> str:
        u = self.nvml.nvmlDeviceGetUUID(handle)
        return u.decode() if isinstance(u, bytes) else str(u)

    def inventory(self) -> list[str] | None:
        """UUIDs of the devices NVML sees now; None when NVML is off or the query failed."""
        if not self.available:
            return None
        try:
            return [self._uuid(h) for h in self._handles()]
        except self.nvml.NVMLError as e:
            log.warning("NVML device query failed: %s", e)
            return None

    def usage(self, pids: set[int]) -> dict[str, int]:
        """GPU UUID → bytes used by any of ``pids`` (compute and graphics contexts)."""
        if not self.available or not pids:
            return {}
        out: dict[str, int] = {}
        try:
            for h in self._handles():
                procs = list(self.nvml.nvmlDeviceGetComputeRunningProcesses(h))
                procs += list(self.nvml.nvmlDeviceGetGraphicsRunningProcesses(h))
                used = sum(int(p.usedGpuMemory or 0) for p in procs if p.pid in pids)
                if any(p.pid in pids for p in procs):
                    out[self._uuid(h)] = used
        except self.nvml.NVMLError as e:
            log.warning("NVML query failed: %s", e)
        return out

    def wait_released(self, pids: set[int], timeout: float, poll: float = 0.5) -> bool:
        """True once none of ``pids`` holds GPU memory (or NVML is unavailable)."""
        deadline = time.monotonic() + timeout
        while self.usage(pids):
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)
        return True

    def _register_events(self) -> None:
        kinds = 0
        for name in XID_EVENT_NAMES:
            kinds |= int(getattr(self.nvml, name, 0))
        if not kinds:
            return
        try:
            es = self.nvml.nvmlEventSetCreate()
            for h in self._handles():
                self.nvml.nvmlDeviceRegisterEvents(h, kinds, es)
            self._events = es
        except Exception as e:  # not supported on some boards / in containers
            log.info("GPU Xid/ECC events unavailable: %s", e)

    def drain_events(self) -> list[dict[str, Any]]:
        """Xid/ECC events that happened since the last call (non-blocking)."""
        out: list[dict[str, Any]] = []
        if self._events is None:
            return out
        while True:
            try:
                ev = self.nvml.nvmlEventSetWait(self._events, 0)
            except self.nvml.NVMLError:
                return out  # NVML_ERROR_TIMEOUT: nothing pending (other NVML errors: no events now)
            out.append({"gpu": self._uuid(ev.device), "type": int(ev.eventType), "xid": int(ev.eventData)})

    def stop(self) -> None:
        if self.available:
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError as e:  # shutting down anyway; nothing is at stake
                log.info("nvmlShutdown: %s", e)


def note_gpus(gpus: Gpus, st: Any, journal: Any) -> None:
    """Record which GPUs the attempt uses (the restart gate waits for them to be freed)."""
    if not gpus.available or not st.current.child:
        return
    pids = {st.current.child["pid"]}
    try:
        pids |= {c.pid for c in psutil.Process(st.current.child["pid"]).children(recursive=True)}
    except psutil.Error:
        pass
    used = sorted(gpus.usage(pids))
    if used and used != st.current.gpus:
        st.current.gpus = used
        journal.event(st, "gpus", f"uses {', '.join(used)}", gpus=used)
        journal.save(st)


def gpu_event(jobs: Any, ev: dict[str, Any], journal: Any) -> None:
    """Attach an NVML Xid/ECC event to every running job on that GPU."""
    for st in jobs:
        if st.state in ("running", "stopping") and ev["gpu"] in (st.current.gpus or []):
            reason = f"NVML event type {ev['type']} (Xid {ev['xid']}) on {ev['gpu']}"
            journal.event(st, "gpu-error", reason, **ev)
