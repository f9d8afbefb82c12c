"""Test storages: RecordingStorage logs every change so crash states can be rebuilt from it,
FaultyStorage fails with an OSError at a chosen write, flush or metadata event.

RecordingStorage's log holds ``("write", offset, bytes)``, ``("truncate", size)``,
``("punch", offset, length)``, ``("allocate", offset, length)``, ``("flush",)`` and
``("event", name)``; `apply_op` replays one entry onto a bytearray. Test support only: nothing
under src/ outside qcow2kit.testing imports it.
"""


from __future__ import annotations

import errno as _errno
import os
from pathlib import Path
from typing import Any

from ..io.memory import MemoryStorage

LogEntry = tuple[Any, ...]



# ---------------------------------------------------------------------------------------------
# recording
# ---------------------------------------------------------------------------------------------
class RecordingStorage(MemoryStorage):
    """A Storage over an in-memory copy of ``initial`` that records everything done to it.

    ``log`` holds the operations in order; ``initial`` the bytes the log starts from.
    ``restart()`` makes the current contents the new ``initial`` and empties the log, so a test
    can open an image first and record only its workload.
    """

    def __init__(
        self, initial: bytes = b"", name: str = "<recording>", writable: bool = True
    ) -> None:
        super().__init__(initial, name, writable)
        self.initial = bytes(initial)
        self.log: list[LogEntry] = []

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], writable: bool = True) -> RecordingStorage:
        return cls(Path(path).read_bytes(), name=str(path), writable=writable)

    def restart(self) -> None:
        """Forget the log so far: the current contents become ``initial``."""
        self.initial = bytes(self.buf)
        self.log.clear()

    def contents(self) -> bytes:
        return bytes(self.buf)

    @property
    def ops(self) -> list[LogEntry]:
        """The log without events."""
        return [e for e in self.log if e[0] != "event"]

    # ---- Storage protocol: every change is applied and logged --------------------------------
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_write()
        payload = bytes(data)
        apply_op(self.buf, ("write", offset, payload))
        self.log.append(("write", offset, payload))

    def flush(self) -> None:
        self.log.append(("flush",))

    def truncate(self, size: int) -> None:
        self._check_write()
        apply_op(self.buf, ("truncate", size))
        self.log.append(("truncate", size))

    def punch_hole(self, offset: int, length: int) -> None:
        self._check_write()
        apply_op(self.buf, ("punch", offset, length))
        self.log.append(("punch", offset, length))

    def allocate(self, offset: int, length: int) -> None:
        self._check_write()
        apply_op(self.buf, ("allocate", offset, length))
        self.log.append(("allocate", offset, length))

    def event(self, name: str) -> None:
        self.log.append(("event", name))


def apply_op(buf: bytearray, op: LogEntry) -> None:
    kind = op[0]
    if kind == "write":
        offset, data = op[1], op[2]
        end = offset + len(data)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[offset:end] = data
    elif kind == "truncate":
        size = op[1]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
    elif kind == "punch":
        offset, length = op[1], op[2]
        end = min(offset + length, len(buf))
        if end > offset:
            buf[offset:end] = bytes(end - offset)
    elif kind == "allocate":
        end = op[1] + op[2]
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
    elif kind in ("flush", "event"):
        pass
    else:
        raise ValueError(f"unknown log entry {op!r}")


# ---------------------------------------------------------------------------------------------
# failing storage
# ---------------------------------------------------------------------------------------------
class FaultyStorage(MemoryStorage):
    """MemoryStorage that raises OSError at a chosen point.

    fail_write_at: the N-th pwrite (1-based, counted from construction or `arm()`) fails.
    fail_flush_at: the N-th flush fails.
    fail_event / fail_event_at: the N-th time `event(fail_event)` is called it raises, i.e.
        just before that metadata write.
    sticky: once failed, every later pwrite/flush/truncate fails too (a dead disk); otherwise
        only the one operation fails.
    error: the errno raised (ENOSPC by default; EIO is the other common one).
    `failed` tells whether the fault fired; `events` lists every event seen.
    """

    def __init__(
        self,
        data: bytes = b"",
        *,
        name: str = "<faulty>",
        writable: bool = True,
        fail_write_at: int | None = None,
        fail_flush_at: int | None = None,
        fail_event: str | None = None,
        fail_event_at: int = 1,
        error: int = _errno.ENOSPC,
        sticky: bool = False,
    ) -> None:
        super().__init__(data, name=name, writable=writable)
        self.fail_write_at = fail_write_at
        self.fail_flush_at = fail_flush_at
        self.fail_event = fail_event
        self.fail_event_at = fail_event_at
        self.error = error
        self.sticky = sticky
        self.failed = False
        self.events: list[str] = []
        self.writes = 0
        self.flushes = 0
        self.event_hits = 0

    def arm(self, **settings: Any) -> None:
        """Reset counters (and optionally change settings) so faults count from now."""
        for key, value in settings.items():
            if not hasattr(self, key):
                raise AttributeError(key)
            setattr(self, key, value)
        self.writes = self.flushes = self.event_hits = 0
        self.failed = False

    def _raise(self, what: str) -> None:
        self.failed = True
        raise OSError(self.error, f"{os.strerror(self.error)} (injected at {what})")

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        if (self.sticky and self.failed) or self.writes == self.fail_write_at:
            self._raise(f"write #{self.writes}")
        super().pwrite(offset, data)

    def flush(self) -> None:
        self.flushes += 1
        if (self.sticky and self.failed) or self.flushes == self.fail_flush_at:
            self._raise(f"flush #{self.flushes}")

    def truncate(self, size: int) -> None:
        if self.sticky and self.failed:
            self._raise("truncate")
        super().truncate(size)

    def event(self, name: str) -> None:
        self.events.append(name)
        if self.sticky and self.failed:
            self._raise(f"event {name}")
        if self.fail_event is not None and name == self.fail_event:
            self.event_hits += 1
            if self.event_hits == self.fail_event_at:
                self._raise(f"event {name} #{self.event_hits}")


__all__ = ["LogEntry", "RecordingStorage", "FaultyStorage", "apply_op"]
