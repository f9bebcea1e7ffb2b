"""The run's metric history: ``history.csv``, its events, TensorBoard (see ``recorder.py``).

Importing this package does not import torch: the CLI reads histories with it.
"""

from __future__ import annotations

from .csvfile import HISTORY_FILE, HistoryTable, NotAHistoryError, Row, read_history
from .recorder import EVENTS_FILE, History
from .tensorboard import TENSORBOARD_DIR

__all__ = [
    "EVENTS_FILE",
    "HISTORY_FILE",
    "TENSORBOARD_DIR",
    "History",
    "HistoryTable",
    "NotAHistoryError",
    "Row",
    "read_history",
]
