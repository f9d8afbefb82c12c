"""The Storage protocol every image sits on: positioned reads and writes, flush, truncate,
hole punching, and a named event hook that fault-injecting test storage uses."""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object  # only type checkers need the protocol machinery


class Storage(Protocol):
    name: str
    writable: bool

    def pread(self, offset: int, length: int) -> bytes:
        """Read up to length bytes; bytes past the end of the storage read as zeros."""
        ...

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...

    def truncate(self, size: int) -> None: ...

    def size(self) -> int: ...

    def punch_hole(self, offset: int, length: int) -> None: ...

    def allocate(self, offset: int, length: int) -> None:
        """Reserve space (fallocate) without changing what the range reads."""
        ...

    def allocated_bytes(self) -> int: ...

    def close(self) -> None: ...

    def event(self, name: str) -> None:
        """Called before every metadata write; a no-op on real storage."""
        ...
