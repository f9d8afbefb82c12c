"""Header extensions: decode, encode, and the feature-name table.

Unknown extensions are kept as Unknown(type, data) and written back verbatim.
"""

from __future__ import annotations

import struct

from ..errors import FormatError
from . import constants as C
from .features import FEATURE_NAMES

_EXT_HEADER = struct.Struct(">II")
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_BYTES = 1024 * MAX_BITMAPS
MAX_BACKING_FORMAT_BYTES = 15  # QEMU keeps the name in a 16-byte buffer
CRYPTO_EXTENSION_BYTES = 16
CRYPT_LUKS = 2


TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from typing import Final


class Extension:
    """One header extension (immutable; plain class: dataclasses cost start-up time)."""

    __slots__ = ("type", "data")

    def __init__(self, type: int, data: bytes) -> None:  # noqa: A002 (the spec's name)
        self.type: Final = type
        self.data: Final = data

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Extension):
            return NotImplemented
        return (self.type, self.data) == (other.type, other.data)

    def __hash__(self) -> int:
        return hash((self.type, self.data))

    def __repr__(self) -> str:
        return f"Extension(type={self.type!r}, data={self.data!r})"


class BitmapsExtension:
    """The bitmaps extension's fields (immutable)."""

    __slots__ = ("nb_bitmaps", "directory_size", "directory_offset")

    STRUCT = struct.Struct(">IIQQ")

    def __init__(self, nb_bitmaps: int, directory_size: int, directory_offset: int) -> None:
        self.nb_bitmaps: Final = nb_bitmaps
        self.directory_size: Final = directory_size
        self.directory_offset: Final = directory_offset

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BitmapsExtension):
            return NotImplemented
        return (self.nb_bitmaps, self.directory_size, self.directory_offset) == (
            other.nb_bitmaps, other.directory_size, other.directory_offset)

    def __hash__(self) -> int:
        return hash((self.nb_bitmaps, self.directory_size, self.directory_offset))

    def __repr__(self) -> str:
        return (f"BitmapsExtension(nb_bitmaps={self.nb_bitmaps}, directory_size="
                f"{self.directory_size}, directory_offset={self.directory_offset})")

    @classmethod
    def from_bytes(cls, data: bytes) -> BitmapsExtension:
        if len(data) != cls.STRUCT.size:
            raise FormatError(f"bitmaps extension: length {len(data)}, expected 24")
        nb, reserved, dsize, doff = cls.STRUCT.unpack(data)
        if reserved != 0:
            raise FormatError(f"bitmaps extension: reserved field is {reserved:#x}, not zero")
        return cls(nb, dsize, doff)

    def validate(self, cluster_size: int) -> None:
        """QEMU's limits on the bitmaps extension (checked when the autoclear bit is set)."""
        if self.nb_bitmaps == 0:
            raise FormatError("bitmaps extension: nb_bitmaps is 0 (an extension with no bitmaps)")
        if self.nb_bitmaps > MAX_BITMAPS:
            raise FormatError(
                f"bitmaps extension: nb_bitmaps {self.nb_bitmaps} exceeds the limit {MAX_BITMAPS}"
            )
        if self.directory_size > MAX_BITMAP_DIRECTORY_BYTES:
            raise FormatError(
                f"bitmaps extension: directory_size {self.directory_size} exceeds the limit "
                f"{MAX_BITMAP_DIRECTORY_BYTES}"
            )
        if self.directory_offset % cluster_size or self.directory_offset == 0:
            raise FormatError(
                f"bitmaps extension: directory_offset {self.directory_offset:#x} is not a "
                f"non-zero multiple of the cluster size {cluster_size}"
            )
        if self.directory_offset >= C.MAX_HOST_OFFSET:
            raise FormatError(
                f"bitmaps extension: directory_offset {self.directory_offset:#x} is beyond the "
                "2^56 host offset limit"
            )

    def to_bytes(self) -> bytes:
        return self.STRUCT.pack(self.nb_bitmaps, 0, self.directory_size, self.directory_offset)


def parse_extensions(buf: bytes, start: int, end: int) -> list[Extension]:
    """Read extensions from buf[start:end]; stop at the end marker."""
    exts: list[Extension] = []
    seen: set[int] = set()
    pos = start
    while pos + 8 <= end:
        ext_type, length = _EXT_HEADER.unpack_from(buf, pos)
        pos += 8
        if ext_type == C.EXT_END:
            return exts
        if length > end - pos:
            raise FormatError(
                f"header extension {ext_type:#x}: length {length} exceeds the "
                f"{end - pos} bytes left in the header cluster"
            )
        if ext_type in seen and ext_type != 0:
            raise FormatError(f"header extension {ext_type:#x} appears twice")
        seen.add(ext_type)
        exts.append(Extension(ext_type, bytes(buf[pos : pos + length])))
        pos += (length + 7) & ~7
    return exts


def encode_extensions(exts: list[Extension]) -> bytes:
    out = bytearray()
    for ext in exts:
        out += _EXT_HEADER.pack(ext.type, len(ext.data))
        out += ext.data
        out += b"\0" * (-len(ext.data) % 8)
    out += _EXT_HEADER.pack(C.EXT_END, 0)
    return bytes(out)


def feature_table_bytes() -> bytes:
    out = bytearray()
    for ftype, bit, name in FEATURE_NAMES:
        out += struct.pack(">BB46s", ftype, bit, name.encode())
    return bytes(out)


def feature_names(data: bytes) -> dict[tuple[int, int], str]:
    names: dict[tuple[int, int], str] = {}
    for pos in range(0, len(data) - 47, 48):
        ftype, bit, raw = struct.unpack_from(">BB46s", data, pos)
        names[(ftype, bit)] = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    return names
