"""Helpers shipped for tests: fault-injecting storage, reference model, strategies.
Nothing under src/ imports this package."""

from .faults import (
    CrashStateError,
    FaultyStorage,
    RecordingStorage,
    check_crash_states,
    count_states,
    crash_images,
    is_prefix_label,
)
from .model import DiskModel

__all__ = [
    "CrashStateError",
    "DiskModel",
    "FaultyStorage",
    "RecordingStorage",
    "check_crash_states",
    "count_states",
    "crash_images",
    "is_prefix_label",
]
