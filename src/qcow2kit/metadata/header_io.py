"""Reading the header from storage and rewriting single header fields with one write each."""

from __future__ import annotations

import struct

from ..errors import FormatError
from ..format import constants as C
from ..format.header import Header
from ..io.storage import Storage


def read_header(storage: Storage) -> Header:
    size = storage.size()
    if size < C.V2_HEADER_LENGTH:
        raise FormatError(f"{storage.name}: file too short to be a qcow2 image ({size} bytes)")
    head = storage.pread(0, min(size, 4096))
    cluster_bits = struct.unpack_from(">I", head, 20)[0]
    if int.from_bytes(head[:4], "big") != C.MAGIC:
        raise FormatError(f"{storage.name}: Image is not in qcow2 format")
    if C.MIN_CLUSTER_BITS <= cluster_bits <= C.MAX_CLUSTER_BITS and (1 << cluster_bits) > len(head):
        head = storage.pread(0, min(size, 1 << cluster_bits))
    header = Header.from_bytes(head)
    header.check_fits(size)  # before anything reads a table the header points at
    return header


def write_field(storage: Storage, offset: int, data: bytes, event: str = "header_update") -> None:
    """One small write inside the first sector: atomic on every real device."""
    storage.event(event)
    storage.pwrite(offset, data)


def write_incompatible(storage: Storage, bits: int) -> None:
    write_field(storage, C.HEADER_INCOMPAT_OFFSET, struct.pack(">Q", bits))


def write_autoclear(storage: Storage, bits: int) -> None:
    write_field(storage, C.HEADER_AUTOCLEAR_OFFSET, struct.pack(">Q", bits))


def write_size(storage: Storage, size: int) -> None:
    write_field(storage, C.HEADER_SIZE_OFFSET, struct.pack(">Q", size))
