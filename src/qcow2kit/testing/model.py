"""A reference model of a virtual disk: a bytearray plus what discard means with a backing
file. Tests mirror every Image operation here and compare."""

from __future__ import annotations


class DiskModel:
    """What the guest should read after a sequence of writes, zeroings and discards.

    ``backing`` is what the backing file shows (shorter than the disk: the rest reads zeros);
    discarded ranges read as the backing file again, zeroed ranges read zeros.
    """

    def __init__(self, size: int, backing: bytes | None = None) -> None:
        self.size = size
        self.backing = backing
        self.data = bytearray(size)
        if backing is not None:
            n = min(size, len(backing))
            self.data[:n] = backing[:n]

    def _range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range [{offset}, {offset + length}) outside [0, {self.size})")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._range(offset, len(data))
        self.data[offset : offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int) -> None:
        self._range(offset, length)
        self.data[offset : offset + length] = bytes(length)

    def discard(self, offset: int, length: int) -> None:
        self._range(offset, length)
        fill = bytearray(length)
        if self.backing is not None and offset < len(self.backing):
            part = self.backing[offset : offset + length]
            fill[: len(part)] = part
        self.data[offset : offset + length] = fill

    def read(self, offset: int, length: int) -> bytes:
        self._range(offset, length)
        return bytes(self.data[offset : offset + length])

    def raw(self) -> bytes:
        return bytes(self.data)


__all__ = ["DiskModel"]
