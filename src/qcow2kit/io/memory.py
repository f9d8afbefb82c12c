"""MemoryStorage: a bytearray-backed Storage for unit tests and fuzzing."""

from __future__ import annotations

from ..errors import ImageStateError


class MemoryStorage:
    def __init__(self, data: bytes = b"", name: str = "<memory>", writable: bool = True) -> None:
        self.buf = bytearray(data)
        self.name = name
        self.writable = writable
        self.closed = False

    def _check_write(self) -> None:
        if not self.writable:
            raise ImageStateError(f"{self.name} is read-only")

    def pread(self, offset: int, length: int) -> bytes:
        out = bytes(self.buf[offset : offset + length])
        return out + b"\0" * (length - len(out))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_write()
        end = offset + len(data)
        if end > len(self.buf):
            self.buf.extend(b"\0" * (end - len(self.buf)))
        self.buf[offset:end] = data

    def flush(self) -> None:
        pass

    def truncate(self, size: int) -> None:
        self._check_write()
        if size < len(self.buf):
            del self.buf[size:]
        else:
            self.buf.extend(b"\0" * (size - len(self.buf)))

    def size(self) -> int:
        return len(self.buf)

    def punch_hole(self, offset: int, length: int) -> None:
        self._check_write()
        end = min(offset + length, len(self.buf))
        if end > offset:
            self.buf[offset:end] = bytes(end - offset)

    def allocate(self, offset: int, length: int) -> None:
        self._check_write()
        if offset + length > len(self.buf):
            self.buf.extend(b"\0" * (offset + length - len(self.buf)))

    def allocated_bytes(self) -> int:
        return len(self.buf)

    def close(self) -> None:
        self.closed = True

    def event(self, name: str) -> None:
        pass
