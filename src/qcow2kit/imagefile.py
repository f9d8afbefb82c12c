"""ImageFile: a seekable binary file object (io.RawIOBase) over a virtual disk.

Owns only the file position and the io protocol; every byte goes through the disk's own
read/write, so range checks, locking and crash ordering stay where they live. Must not
import qcow2kit.image (the image imports this module).
"""

from __future__ import annotations

import errno
import io
from typing import Protocol


class Disk(Protocol):
    @property
    def virtual_size(self) -> int: ...

    @property
    def writable(self) -> bool: ...

    @property
    def closed(self) -> bool: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def flush(self) -> None: ...


class ImageFile(io.RawIOBase):
    """io.RawIOBase view of an Image's virtual disk (read, readinto, write, seek, tell)."""

    def __init__(self, image: Disk) -> None:
        super().__init__()
        self.image = image
        self.pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self.image.writable

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            new = offset
        elif whence == io.SEEK_CUR:
            new = self.pos + offset
        elif whence == io.SEEK_END:
            new = self.image.virtual_size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if new < 0:
            raise ValueError("negative seek position")
        self.pos = new
        return new

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        mv = memoryview(b).cast("B")
        n = max(0, min(len(mv), self.image.virtual_size - self.pos))
        if n:
            mv[:n] = self.image.read(self.pos, n)
            self.pos += n
        return n

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        mv = memoryview(b).cast("B")
        if self.pos + len(mv) > self.image.virtual_size:
            raise OSError(errno.ENOSPC, "write past the end of the virtual disk")
        self.image.write(self.pos, mv)
        self.pos += len(mv)
        return len(mv)

    def flush(self) -> None:
        if not self.closed and self.image.writable and not self.image.closed:
            self.image.flush()


__all__ = ["ImageFile", "Disk"]
