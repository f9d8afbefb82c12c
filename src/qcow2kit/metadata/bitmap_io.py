"""Writing persistent dirty bitmaps to disk: data clusters and tables, the header switch to
a new directory, the autoclear bit that says the bitmaps extension is valid, and the bit
arithmetic on packed bitmaps.

Owns the byte-level writes of metadata/bitmaps.py's store protocol; the order of the steps
(and why it is crash-safe) is documented there. Every new cluster comes from
Refcounts.allocate; nothing here frees or flushes on its own except where a step says so.
Never imports qcow2kit.image.
"""

from __future__ import annotations

import struct
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from ..errors import UnsupportedFeatureError
from ..format import bitmaps as fmt
from ..format import constants as C
from ..format.extensions import BitmapsExtension, Extension
from ..format.features import Autoclear
from ..format.header import Header
from . import header_io
from .meta import Metadata

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
_EXT_HEADER_BYTES = 8


def write_autoclear(meta: Metadata, bits: int) -> None:
    header_io.write_autoclear(meta.storage, bits)
    meta.storage.flush()
    meta.header = meta.header.replace(autoclear_features=bits)


def write_bitmap(meta: Metadata, e: fmt.BitmapEntry, bits: U8) -> fmt.BitmapEntry:
    """New data clusters for the non-zero parts, then a new table."""
    cs = meta.geom.cluster_size
    n = fmt.table_entries(meta.header.size, e.granularity_bits, cs)
    padded = np.zeros(n * cs, dtype=np.uint8)
    padded[: len(bits)] = bits
    rows = padded.reshape(n, cs) if n else padded.reshape(0, cs)
    nonzero = np.flatnonzero(rows.any(axis=1))
    table = np.zeros(n, dtype=np.uint64)
    if len(nonzero):
        first = meta.refcounts.allocate(len(nonzero))
        hosts = (first + np.arange(len(nonzero), dtype=np.int64)) * cs
        meta.storage.event("bitmap_data_write")
        meta.storage.pwrite(int(hosts[0]), rows[nonzero].tobytes())
        table[nonzero] = hosts.astype(np.uint64)
    tclusters = -(-n * 8 // cs)
    table_at = meta.refcounts.allocate(tclusters) * cs if tclusters else 0
    if tclusters:
        raw = table.astype(">u8").tobytes()
        meta.storage.event("bitmap_table_write")
        meta.storage.pwrite(table_at, raw + bytes(tclusters * cs - len(raw)))
    return replace(e, bitmap_table_offset=table_at, bitmap_table_size=n,
                   flags=e.flags & ~fmt.FLAG_IN_USE)


def switch_header(meta: Metadata, ext: BitmapsExtension | None) -> None:
    """One write of the extension's 24 bytes when it stays where it is; otherwise the
    header is rewritten (the bitmaps extension is added or dropped) with bit 0 clear,
    and bit 0 set by a separate 8-byte write after that is durable."""
    h = meta.header
    payload = None if ext is None else struct.pack(">IIQQ", ext.nb_bitmaps, 0, ext.directory_size,
                                                  ext.directory_offset)
    at = extension_payload_offset(meta.header)
    if payload is not None and at is not None and h.autoclear_features & Autoclear.BITMAPS:
        header_io.write_field(meta.storage, at, payload, "bitmap_extension_update")
        exts = tuple(Extension(x.type, payload) if x.type == C.EXT_BITMAPS else x
                     for x in h.extensions)
        meta.header = h.replace(extensions=exts)
        return
    others = tuple(x for x in h.extensions if x.type != C.EXT_BITMAPS)
    exts = others + ((Extension(C.EXT_BITMAPS, payload),) if payload is not None else ())
    bits = h.autoclear_features & ~Autoclear.BITMAPS
    new = h.replace(extensions=exts, autoclear_features=bits).relayout()
    raw = new.to_bytes()
    if len(raw) > meta.geom.cluster_size:
        raise UnsupportedFeatureError("the header extensions no longer fit in cluster 0")
    meta.storage.event("header_update")
    meta.storage.pwrite(0, raw)
    meta.storage.flush()
    meta.header = new
    if payload is not None:
        write_autoclear(meta, bits | Autoclear.BITMAPS)


def extension_payload_offset(h: Header) -> int | None:
    pos = h.header_length
    for x in h.extensions:
        if x.type == C.EXT_BITMAPS:
            return pos + _EXT_HEADER_BYTES
        pos += _EXT_HEADER_BYTES + len(x.data) + (-len(x.data) % 8)
    return None


def set_bits(bits: U8, first: int, last: int) -> None:
    """Set bits first..last (inclusive), LSB first within each byte."""
    last = min(last, len(bits) * 8 - 1)
    if first > last:
        return
    b0, b1 = first >> 3, last >> 3
    lo = np.uint8((0xFF << (first & 7)) & 0xFF)
    hi = np.uint8(0xFF >> (7 - (last & 7)))
    if b0 == b1:
        bits[b0] |= lo & hi
        return
    bits[b0] |= lo
    bits[b0 + 1 : b1] = 0xFF
    bits[b1] |= hi


def cluster_span(offset: int, nbytes: int, cs: int) -> I64:
    if nbytes <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(offset // cs, (offset + nbytes - 1) // cs + 1, dtype=np.int64)


__all__ = ["write_autoclear", "write_bitmap", "switch_header", "extension_payload_offset", "set_bits",
           "cluster_span"]
