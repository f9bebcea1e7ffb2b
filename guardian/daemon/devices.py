"""Whole-GPU allocation: the device inventory, who holds which device, and the queue.

Slurm's ``--gres=gpu:N`` model on one machine: a job that asks for N GPUs gets N whole
devices through ``CUDA_VISIBLE_DEVICES`` and no other job gets them while any attempt
of it runs. Jobs that cannot start yet wait in a queue ordered by priority, then
registration time; a job needing more devices than are free blocks the jobs behind it
that need devices too (no starvation of big jobs), while CPU-only jobs pass.

Who holds what is never stored apart from the jobs: it is the ``devices`` of every
running or stopping job's current attempt (state.json), so a restarted daemon knows
the allocation from the same files that tell it which jobs run.

The inventory, in order of precedence: a configured list (``--devices``, knob
``devices``), NVML's device UUIDs, the daemon's own ``CUDA_VISIBLE_DEVICES``. NVML is
asked again every pass: a device that disappears holds the jobs that were using it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .gpu import Gpus
from .knobs import Knobs
from .records import RUNNING, STOPPING, JobSpec, JobState

log = logging.getLogger(__name__)

INVENTORY_FILE = "inventory.json"  # HOME/inventory.json: what ``guardian run --gpus`` checks against


def parse_list(text: str) -> list[str]:
    return [d.strip() for d in text.split(",") if d.strip()]


@dataclass
class Inventory:
    devices: list[str]
    source: str  # "configured", "nvml", "CUDA_VISIBLE_DEVICES" or "none"

    def to_dict(self) -> dict:
        return {"devices": self.devices, "source": self.source}


def discover(gpus: Gpus, k: Knobs, env: Mapping[str, str] | None = None) -> Inventory:
    """The devices this daemon may hand out, and where that list came from."""
    env = os.environ if env is None else env
    if k.devices.strip():
        return Inventory(parse_list(k.devices), "configured")
    seen = gpus.inventory()
    if seen is not None:
        return Inventory(seen, "nvml")
    if env.get("CUDA_VISIBLE_DEVICES", "").strip():
        return Inventory(parse_list(env["CUDA_VISIBLE_DEVICES"]), "CUDA_VISIBLE_DEVICES")
    return Inventory([], "none")


def held(jobs: Iterable[JobState]) -> dict[str, str]:
    """Device → name of the job whose running (or stopping) attempt holds it."""
    out: dict[str, str] = {}
    for st in jobs:
        if st.state in (RUNNING, STOPPING) and st.current is not None:
            for d in st.current.devices:
                out[d] = st.name
    return out


def queue_order(specs: Mapping[str, JobSpec], names: Iterable[str]) -> list[str]:
    """Higher priority first; equal priorities in registration order (FIFO), then by name."""

    def key(name: str) -> tuple:
        spec = specs.get(name)
        return (-(spec.priority if spec else 0), spec.created if spec else 0.0, name)

    return sorted(names, key=key)


def visible_devices(spec: JobSpec, devices: list[str]) -> str | None:
    """The job's ``CUDA_VISIBLE_DEVICES``: its devices, "" when CPU-only, None: leave as given."""
    if spec.cpu_only:
        return ""
    if spec.gpus:
        return ",".join(devices)
    return None


class Allocator:
    """Decides, within one pass, which waiting jobs may start and on which devices."""

    def __init__(self, gpus: Gpus, k: Knobs) -> None:
        self.gpus, self.k = gpus, k
        self.inventory = Inventory([], "none")
        self.blocked: str | None = None  # a GPU job earlier in this pass's queue that could not start
        self.published = False  # inventory.json written at least once
        self.changed = False  # the last refresh changed the inventory

    def refresh(self) -> list[str]:
        """Re-read the inventory; returns the devices that disappeared since last time."""
        old = self.inventory
        seen = discover(self.gpus, self.k)
        if old.source == "nvml" and seen.source != "nvml":
            log.warning("NVML did not answer; keeping the last known GPU inventory")
            self.changed = False
            return []  # a failed query is not every device vanishing at once
        self.inventory = seen
        gone = [d for d in old.devices if d not in self.inventory.devices]
        self.changed = self.inventory.devices != old.devices
        if self.changed:
            log.info(
                "GPU inventory (%s): %s", self.inventory.source, ", ".join(self.inventory.devices) or "none"
            )
        return gone

    def new_pass(self) -> None:
        self.blocked = None

    def wait_reason(self, spec: JobSpec, jobs: Mapping[str, JobState]) -> str | None:
        """Why ``spec`` must stay queued now (None: it may start); see ``take``."""
        running = sum(1 for st in jobs.values() if st.state in (RUNNING, STOPPING))
        if self.k.max_concurrent and running >= self.k.max_concurrent:
            return f"queued: {running} jobs running (--max-concurrent {self.k.max_concurrent})"
        if not spec.gpus:
            return None
        free = self.free(jobs)
        if self.blocked is None and len(free) >= spec.gpus:
            return None
        holders = sorted(set(held(jobs.values()).values()))
        if self.gpus.available and self.draining(jobs):
            holders.append("memory of an ended attempt not yet released")
        why = f"needs {spec.gpus} GPU(s), {len(free)} free of {len(self.inventory.devices)}" + (
            f" (held by {', '.join(holders)})" if holders else ""
        )
        if self.blocked is not None:
            return f"queued behind {self.blocked}: {why}"
        self.blocked = spec.name
        return f"queued: {why}"

    def free(self, jobs: Mapping[str, JobState]) -> list[str]:
        taken = set(held(jobs.values())) | self.draining(jobs)
        return [d for d in self.inventory.devices if d not in taken]

    def draining(self, jobs: Mapping[str, JobState]) -> set[str]:
        """Devices where a recently ended attempt's process still holds memory (NVML).

        A dead job's memory can outlive it for a while (a zombie, a driver still
        tearing down); the next job on that device would run out of memory. Waits at
        most ``gpu_release_timeout`` after the attempt ended.
        """
        if not self.gpus.available:
            return set()
        now = time.time()
        pids = {
            st.current.child["pid"]
            for st in jobs.values()
            if st.state not in (RUNNING, STOPPING)
            and st.current is not None
            and st.current.child
            and st.current.ended
            and now - st.current.ended < self.k.gpu_release_timeout
        }
        return set(self.gpus.usage(pids)) if pids else set()

    def take(self, spec: JobSpec, jobs: Mapping[str, JobState]) -> list[str]:
        """The devices for ``spec``'s next attempt (call after ``wait_reason`` said go)."""
        return self.free(jobs)[: spec.gpus or 0]

    def too_big(self, spec: JobSpec) -> str | None:
        """A hold reason when ``spec`` asks for more devices than exist (it would wait forever)."""
        have = len(self.inventory.devices)
        if spec.gpus and spec.gpus > have:
            return (
                f"needs {spec.gpus} GPU(s) but the inventory ({self.inventory.source}) has {have}"
                + (f": {', '.join(self.inventory.devices)}" if have else "")
                + "; held — re-register with fewer --gpus, or fix the GPU"
            )
        return None


def new_pass(alloc: Allocator, home: Any, jobs: Iterable[JobState], stopper: Any, tag: Any) -> None:
    """Once per supervisor pass: re-read the inventory, act on lost devices, reset the queue."""
    first = not alloc.published
    lost = alloc.refresh()
    if lost or first or alloc.changed:
        publish(home, alloc.inventory)
        alloc.published = True
        mark_lost(jobs, lost, stopper, stopper.journal, tag)
    alloc.new_pass()


def publish(home: Any, inventory: Inventory) -> None:
    """Write HOME/inventory.json, so ``guardian run --gpus N`` can refuse what cannot fit."""
    from .registry import write_json

    write_json(home.path(INVENTORY_FILE), inventory.to_dict())


def mark_lost(jobs: Iterable[JobState], gone: list[str], stopper: Any, journal: Any, tag: Any) -> None:
    """Jobs running on a device that vanished: record why, ask them to checkpoint and stop.

    They end held (``Attempt.lost``), not restarted: a restart would need the device back,
    and a person should look at a GPU that fell off the bus.
    """
    if not gone:
        return
    for st in jobs:
        if st.state not in (RUNNING, STOPPING) or st.current is None:
            continue
        lost = sorted(set(st.current.devices) & set(gone))
        if not lost:
            continue
        why = f"GPU {', '.join(lost)} disappeared from the inventory while attempt {st.current.n} ran"
        st.current.lost = f"{why}; held — check the device (nvidia-smi), then `guardian resume {st.name}`"
        journal.event(st, "device-lost", why, devices=lost)
        if st.state == RUNNING:
            stopper.begin(st, "request", "usr2", stopper.k.stop_grace, nproc=None, tag=tag(st))
        else:
            journal.save(st)
