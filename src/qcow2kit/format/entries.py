"""L2 entry and compressed-descriptor decoding, vectorised: the one place that knows which
bit of an L2 entry means what.

Owns: splitting (the first words of) L2 entries into their flags and host offset, the
compressed-cluster descriptor (host byte offset and byte length), and the host clusters an
entry holds a reference on. Pure functions over numpy arrays or ints; no I/O, no state.
Must not import anything outside qcow2kit.format.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import numpy.typing as npt

from . import constants as C
from .geometry import Geometry

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

_DESCRIPTOR_MASK = (1 << 62) - 1


class L2Fields:
    """The fields of standard L2 entries (or the first word of extended ones), each
    computed on first use (a hot caller that needs two fields pays for two).

    `host` is the offset field of non-compressed entries (0 where compressed), `zero` the
    zero flag (bit 0) of non-compressed entries, `descriptor` the compressed-cluster
    descriptor (0 where not compressed)."""

    def __init__(self, entries: U64) -> None:
        self.entries = np.asarray(entries, dtype=np.uint64)

    @cached_property
    def compressed(self) -> Bools:
        out: Bools = (self.entries & np.uint64(C.OFLAG_COMPRESSED)) != 0
        return out

    @cached_property
    def copied(self) -> Bools:
        out: Bools = (self.entries & np.uint64(C.OFLAG_COPIED)) != 0
        return out

    @cached_property
    def host(self) -> I64:
        host = (self.entries & np.uint64(C.OFFSET_MASK)).view(np.int64)
        return np.where(self.compressed, 0, host) if self.compressed.any() else host

    @cached_property
    def zero(self) -> Bools:
        out: Bools = ~self.compressed & ((self.entries & np.uint64(1)) != 0)
        return out

    @cached_property
    def descriptor(self) -> U64:
        return np.where(self.compressed, self.entries & np.uint64(_DESCRIPTOR_MASK), np.uint64(0))


def decode_l2(entries: U64) -> L2Fields:
    return L2Fields(entries)


def compressed_extents(descriptors: U64, geom: Geometry) -> tuple[I64, I64]:
    """(host byte offset, byte length) of each compressed cluster's data."""
    desc = np.asarray(descriptors, dtype=np.uint64) & np.uint64(_DESCRIPTOR_MASK)
    x = geom.compressed_offset_bits
    offset = (desc & np.uint64((1 << x) - 1)).astype(np.int64)
    sectors = (
        (desc >> np.uint64(x)) & np.uint64((1 << (geom.cluster_bits - 8)) - 1)
    ).astype(np.int64) + 1
    return offset, sectors * 512 - (offset & 511)


def compressed_extent(descriptor: int, geom: Geometry) -> tuple[int, int]:
    """Scalar form of compressed_extents (the descriptor may carry the flag bits)."""
    offset, length = compressed_extents(np.array([descriptor], dtype=np.uint64), geom)
    return int(offset[0]), int(length[0])


def referenced_clusters(entries: U64, geom: Geometry, data_file: bool) -> I64:
    """Host clusters that a set of L2 entries (first words) hold a reference on: one per
    normal or allocated-zero cluster (none with an external data file), one per host cluster
    that each compressed cluster's bytes touch. Repeats are meaningful (shared clusters)."""
    fields = decode_l2(entries)
    out: list[I64] = []
    if not data_file:
        host = fields.host[~fields.compressed]
        out.append(host[host != 0] >> geom.cluster_bits)
    if fields.compressed.any():
        offset, length = compressed_extents(fields.descriptor[fields.compressed], geom)
        first = offset >> geom.cluster_bits
        last = (offset + length - 1) >> geom.cluster_bits
        out.append(first)
        for extra in range(1, int((last - first).max(initial=0)) + 1):
            out.append((first + extra)[last - first >= extra])
    if not out:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(out)


__all__ = ["L2Fields", "decode_l2", "compressed_extents", "compressed_extent", "referenced_clusters"]
