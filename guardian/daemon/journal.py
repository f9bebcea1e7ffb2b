"""Where every decision goes: one event (events.jsonl + the log) and the job's state.json.

A job whose own files are unusable is *frozen*: its state.json is evidence (it may say
the job finished) and is never overwritten by the daemon; the job stays held in
memory until the file is repaired or the job is re-registered.
"""

from __future__ import annotations

import logging
from typing import Any

from . import registry as reg
from .notify import Notifier, kind_of_state
from .records import JobState
from .safefiles import BadFileError

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, home: reg.Home, notifier: Notifier | None = None) -> None:
        self.home = home
        self.frozen: set[str] = set()
        self.notifier = notifier

    def event(self, st: JobState, event: str, reason: str, **evidence: Any) -> None:
        st.events += 1
        if event == "hang" and self.notifier is not None:
            self.notifier.send(st, "hung")
        log.info("job %s: %s: %s", st.name, event, reason)
        try:
            reg.append_event(self.home, st.name, event, reason, **evidence)
        except BadFileError as e:
            log.error("job %s: event not recorded: %s", st.name, e)

    def save(self, st: JobState) -> None:
        if st.name not in self.frozen:
            reg.save_state(self.home, st)

    def set_state(self, st: JobState, state: str, reason: str, event: str | None = None, **ev: Any) -> None:
        st.state, st.reason = state, reason
        self.event(st, event or state, reason, **ev)
        self.save(st)
        kind = kind_of_state(state, reason)
        if kind and self.notifier is not None:
            self.notifier.send(st, kind)

    def close(self) -> None:
        if self.notifier is not None:
            self.notifier.close()
