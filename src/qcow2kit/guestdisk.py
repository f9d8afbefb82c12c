"""GuestDisk: the surface of an open image that whole-image operations (resizing.py,
compaction.py) work through, so they need not import image.py (which imports them).

Owns nothing but the protocol: the metadata, the backing chain and data file, and the
guest I/O loops without range or state checks (read_guest, write_guest, clear_guest,
write_zero_bytes). Image provides it.
"""

from __future__ import annotations

from typing import Protocol

from .chain import Readable
from .format.header import Header
from .io.storage import Storage
from .metadata.bitmaps import Bitmaps
from .metadata.meta import Metadata


class GuestDisk(Protocol):
    @property
    def meta(self) -> Metadata: ...

    @property
    def backing(self) -> Readable | None: ...

    @property
    def data_storage(self) -> Storage | None: ...

    @property
    def bitmaps(self) -> Bitmaps: ...

    @property
    def header(self) -> Header: ...

    @property
    def virtual_size(self) -> int: ...

    def read_guest(self, offset: int, length: int) -> bytes: ...

    def write_guest(self, offset: int, data: memoryview) -> None: ...

    def clear_guest(self, offset: int, length: int, mode: str) -> None: ...

    def write_zero_bytes(self, offset: int, length: int) -> None: ...


__all__ = ["GuestDisk"]
