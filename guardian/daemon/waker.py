"""Waking the supervisor loop early when a user asks for something.

The loop polls anyway (inotify sees nothing on NFS/Lustre/GPFS); file events only
make it answer sooner. Which events: a file *named* in ``WAKE_NAMES`` created,
modified, moved or deleted (``guardian run`` writes job.json, ``guardian stop`` writes
stop.request), and a new job directory. Nothing else — above all not the daemon's
own reads (watchdog reports opens and closes too) nor its own writes of state.json
and events.jsonl, either of which would make every pass trigger the next one.

Failure to start an observer (no watchdog, no inotify, too many watches) is not an
error: the loop polls anyway.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

log = logging.getLogger(__name__)

WAKE_NAMES = frozenset({"job.json", "stop.request"})
WAKE_KINDS = frozenset({"created", "modified", "moved", "deleted"})


def wants_wake(event_type: str, is_directory: bool, src: str, dest: str | None) -> bool:
    """Whether a file event is one the loop must answer at once (pure, for tests)."""
    if event_type not in WAKE_KINDS:
        return False
    if is_directory:
        return event_type == "created"
    names = {os.path.basename(src)} | ({os.path.basename(dest)} if dest else set())
    return bool(names & WAKE_NAMES)


class Waker:
    def __init__(self) -> None:
        self.event = threading.Event()
        self._observer: Any = None
        self._watched: dict[str, Any] = {}

    def start(self) -> None:
        try:
            from watchdog.observers import Observer
        except ImportError:
            log.info("watchdog not installed: polling only")
            return
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()

    def watch(self, path: str) -> None:
        if self._observer is None or path in self._watched or not os.path.isdir(path):
            return
        from watchdog.events import FileSystemEventHandler

        waker = self

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                dest = getattr(event, "dest_path", None) or None
                if wants_wake(event.event_type, event.is_directory, str(event.src_path), dest and str(dest)):
                    waker.event.set()

        try:
            self._watched[path] = self._observer.schedule(_Handler(), path, recursive=False)
        except OSError as e:
            log.info("%s: not watched (%s); polling covers it", path, e)
            self._watched[path] = None

    def unwatch(self, path: str) -> None:
        handle = self._watched.pop(path, None)
        if handle is not None and self._observer is not None:
            try:
                self._observer.unschedule(handle)
            except (KeyError, ValueError):
                pass

    def watched(self) -> list[str]:
        return sorted(self._watched)

    def wait(self, timeout: float) -> None:
        self.event.wait(timeout)
        self.event.clear()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
