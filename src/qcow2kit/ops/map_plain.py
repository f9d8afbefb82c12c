"""map's fast path: the extents of a plain qcow2 image (every visible cluster a data
cluster, a zero cluster or unallocated, nothing underneath), found without numpy.

Why: `qemu-img map` of a 1 GiB image takes ~50 ms, and importing numpy alone ~45 ms. This
module reads the header (metadata.header_io), the L1 table and the L2 tables as bytes
(metadata.table_bytes) and lets format/lanes.py test and split whole batches of L2 entries at
C speed; Python then touches each extent once.

Handles only what it can answer exactly as ops/map.py would: a qcow2 file (probed, or -f qcow2)
opened read-only with the same locks, the whole disk or a range of it, no backing
file (or --no-backing), no external data file, standard L2 entries, no internal snapshots or
persistent bitmaps (whose directories the full open reads and may reject), every visible L2
entry plain data (aligned, inside the file), unallocated, or (version 3) a zero cluster with or
without a host cluster (aligned, inside the file); no compressed clusters, no reserved bits;
aligned L1 entries and L2 tables inside the file, and, when data clusters are found, an image
that does not look metadata-preallocated to ops/map.py's heuristic (which would split data
clusters by the host file's holes; it never changes what a zero cluster answers): a host file
that is not sparse enough for it to matter, or else refcounts read here that show it does not
hold (its refcount table entries are checked the way that heuristic's lookup checks them).
For anything else, and
for any error, it returns the reason as a string and the caller runs ops/map.py, which gives
the output or the error: so this module never prints, never raises a user-facing error of its
own, and never writes. Must not import numpy, image.py or metadata.meta (start-up time).
"""

from __future__ import annotations

import struct
from itertools import accumulate

from ..chain import probe_format
from ..errors import Qcow2Error
from ..format import constants as C
from ..format.features import Autoclear
from ..format.header import Header
from ..format.lanes import Lanes, flag_positions
from ..io.file import FileStorage
from ..metadata.header_io import read_header
from ..metadata.table_bytes import read_tables
from .map_format import flag_code, human_text, json_text

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from collections.abc import Iterator

# L2 tables read at once: up to this many entries (256 KiB), consecutive in the guest
_BATCH_ENTRIES = 1 << 15
# entries split into runs at once: Python ints of 32 KiB stay in the CPU cache and in the
# allocator's reused memory (in a fresh process, 2 MiB ones made the same work 1.6x slower)
_CHUNK_ENTRIES = 1 << 12
DATA = flag_code(0, True, False, True)  # a data cluster of the image itself
UNALLOCATED = flag_code(0, False, True, False)  # nothing below: reads as zeros
ZERO = flag_code(0, True, True, False)  # a zero cluster: reads as zeros, even with an offset
_NOTHING = flag_code(0, False, False, False)  # qemu-img's one empty extent of an empty disk
_U64 = struct.Struct(">Q")


class PlainExtents:
    """The merged extents, as the columns map_format prints: one file name for all of them
    (an image without a backing chain, all at depth 0), or each extent's own (a chain,
    mapped by ops/map_chain.py). Without a chain, codes[i] is the extent's kind: DATA is
    guest data stored at offsets[i]; every other code (UNALLOCATED, ZERO, the empty extent
    of an empty range) reads as zeros, and a ZERO extent's offset (when >= 0) names a host
    cluster whose stale bytes must never be read as the guest's. ops/convert copies plain
    sources (plain_map with chain=False) by exactly this promise."""

    __slots__ = ("starts", "lengths", "codes", "offsets", "filename")

    def __init__(self, starts: list[int], lengths: list[int], codes: list[int],
                 offsets: list[int], filename: str | list[str]) -> None:
        self.starts, self.lengths, self.codes = starts, lengths, codes
        self.offsets, self.filename = offsets, filename

    def json(self) -> str:
        return json_text(self.starts, self.lengths, self.codes, self.offsets)

    def human(self) -> tuple[str, str | None]:
        names = self.filename
        return human_text(self.starts, self.lengths, self.codes, self.offsets,
                          [names] * len(self.starts) if isinstance(names, str) else names)


def plain_map(path: str, fmt: str | None = None, *, force_share: bool = False,
              backing: bool = True, start: int = 0, length: int | None = None,
              chain: bool = True) -> PlainExtents | str:
    """The extents of the disk of `path` (or of [start, start + length) inside it, as
    ops/map.map_extents cuts them), or why ops/map.py must answer instead. An image with a
    backing file is mapped through its chain (ops/map_chain.py) unless chain=False, which
    declines it (or backing=False, which maps the image alone)."""
    if start < 0 or (length is not None and length < 0):
        return "a negative start or length"
    if backing and chain:
        from .map_chain import chain_map  # (it builds on this module)

        return chain_map(path, fmt, force_share, start, length)
    try:
        if (fmt or probe_format(path)) != "qcow2":
            return "not a qcow2 file"
        storage = FileStorage(path, False, force_share=force_share)
    except (Qcow2Error, OSError) as exc:
        return f"cannot open: {exc}"
    try:
        return _walk(storage, backing, start, length)
    except (Qcow2Error, OSError) as exc:
        return f"error: {exc}"
    finally:
        storage.close()


def unusual(header: Header, backing: bool) -> str | None:
    """Why the image is not plain by its header alone (None: it may be)."""
    if header.refcount_table_clusters == 0 or header.refcount_table_offset == 0:
        return "no refcount table"  # (the full open refuses it)
    if header.has_data_file:
        return "external data file"
    if header.extended_l2:
        return "extended L2 entries"
    if backing and header.backing_file:  # an empty name means none, as in Image
        return "backing file"
    if header.nb_snapshots:
        return "internal snapshots"
    if header.version >= 3 and header.autoclear_features & Autoclear.BITMAPS \
            and header.bitmaps is not None:
        return "persistent bitmaps"
    return None


def l1_batches(hits: list[int], per_batch: int) -> Iterator[tuple[int, int]]:
    """[k, j) slices of `hits` (ascending allocated L1 indices) holding consecutive indices,
    at most per_batch each: their L2 tables map one guest-contiguous range (ops/map.py
    batches its tables the same way)."""
    k = 0
    while k < len(hits):
        j = k + 1
        while j < len(hits) and j - k < per_batch and hits[j] == hits[j - 1] + 1:
            j += 1
        yield k, j
        k = j


def plain_entries(raw: bytes | bytearray, cs: int, zero_flags: bool = False) -> bool:
    """Whether every big-endian u64 entry of `raw` has nothing set but bit 63 (COPIED) and an
    offset aligned to cs below 2**56 (and bit 0, the zero flag, with zero_flags): the shape
    of a plain L2 entry (data, unallocated, or a zero cluster) and of an L1 entry. Tested a
    byte column at a time (bytes.translate runs at C speed)."""
    if raw[0::8].translate(None, b"\x00\x80"):  # compressed, reserved bits 56..61
        return False
    # the zero flag (unless allowed), reserved bits 1..8 and the offset's unaligned bits
    low = cs - 2 if zero_flags else cs - 1
    column = 7
    while low:
        bits = low & 0xFF
        if raw[column::8].translate(_KEEP[bits]).strip(b"\0"):
            return False
        low >>= 8
        column -= 1
    return True


# _KEEP[m]: the byte translation table that keeps the bits of m
_KEEP = {m: bytes(b & m for b in range(256))
         for m in (0x01, 0x03, 0x07, 0x0F, 0x1F, 0x3F, 0x7F, 0xFF, 0xFE)}


def _untagged_breaks(raw: bytes, cs: int, zero_flags: bool
                     ) -> tuple[bytes, bytes | None] | None:
    """Lanes.tagged_breaks's flags for plain entries whatever their COPIED bits (a cluster
    shared with a snapshot once, say) and, with zero_flags, whatever their zero flags (then a
    run also ends where the next entry's zero flag differs), with one byte per entry, 1 where
    its zero flag is set (None: no zero flag); None if some entry is not plain."""
    if not plain_entries(raw, cs, zero_flags):
        return None
    n = len(raw) // 8
    zeros = raw[7::8]  # column 7 holds the zero flag alone now (cs >= 512)
    offsets = bytearray(raw)
    offsets[0::8] = offsets[7::8] = bytes(n)  # COPIED and zero flags off: the offsets alone
    breaks = Lanes.from_bytes(offsets).breaks(cs)
    if not zeros.strip(b"\0"):
        return breaks.translate(_FLAG_80), None
    # 1 where entry i's zero flag differs from entry i + 1's (the last entry breaks anyway)
    differ = int.from_bytes(zeros, "big") ^ int.from_bytes(zeros[1:] + b"\0", "big")
    breaks = (int.from_bytes(breaks, "big") | differ).to_bytes(n, "big")
    return breaks.translate(_FLAG_80), zeros


_FLAG_80 = bytes([0, 0x80]) + bytes(254)  # breaks' 1 as tagged_breaks' 0x80


def _walk(storage: FileStorage, backing: bool, start: int, length: int | None
          ) -> PlainExtents | str:
    header = read_header(storage)  # the checks Image's open makes of the header
    reason = unusual(header, backing)
    if reason is not None:
        return reason
    size = header.size
    end = size if length is None else min(size, start + length)
    name = storage.name
    if start >= end:  # nothing to map: qemu-img's one empty extent
        return PlainExtents([start], [0], [_NOTHING], [-1], name)
    return walk_layer(storage, header, start, end)


def walk_layer(storage: FileStorage, header: Header, start: int, end: int
               ) -> PlainExtents | str:
    """The extents of [start, end) (start < end <= the disk's size) of the image in
    `storage`, whose header `header` passed unusual(): a layer of map's fast path, its
    unallocated ranges UNALLOCATED whatever lies below them."""
    name = storage.name
    cs = header.cluster_size
    l2_entries = cs // 8
    span = cs * l2_entries
    file_size = storage.size()
    # the L1 entries of [start, end) (header validation: the L1 table covers the disk and
    # lies inside the file)
    first_l1 = start // span
    count = (end - 1) // span + 1 - first_l1
    raw_l1 = bytearray(storage.pread(header.l1_table_offset + 8 * first_l1, count * 8))
    if not plain_entries(raw_l1, cs):
        return "L1 entries with reserved bits or unaligned L2 tables"
    raw_l1[0::8] = bytes(count)  # the offsets alone (no COPIED bit)
    in_range = flag_positions(Lanes.from_bytes(raw_l1).nonzero())
    tables = [_U64.unpack_from(raw_l1, 8 * i)[0] for i in in_range]
    hits = [first_l1 + i for i in in_range]
    if tables and max(tables) > file_size - cs:
        return "an L2 table past the end of the file"

    sparse_host = may_look_preallocated(storage, cs, file_size)
    zero_flags = header.version >= 3  # (qemu refuses zero clusters in version 2 images)
    starts: list[int] = []
    lengths: list[int] = []
    offsets: list[int] = []
    zero_runs: list[int] = []  # the indices of the zero extents, ascending
    per_batch = max(1, _BATCH_ENTRIES // l2_entries)
    cluster_bits = header.cluster_bits
    shift = cluster_bits - 3  # guest bytes from the batch's start -> entry bytes
    unpack = _U64.unpack_from
    offset_bits = C.OFFSET_MASK & ~(cs - 1)
    other_bits = ~offset_bits & ~C.OFLAG_COPIED & ((1 << 64) - 1)  # all zero in a plain entry
    pos = start
    for k, j in l1_batches(hits, per_batch):
        base = hits[k] * span
        if pos < base:
            _add(starts, lengths, offsets, zero_runs, pos, base - pos, -1, False)
            pos = base
        bend = min(end, (hits[j - 1] + 1) * span)
        # the entries of [pos, bend): the others are never looked at
        u0 = (pos - base) // cs
        units = -(-(bend - base) // cs) - u0
        raw = read_tables(storage, tables[k:j], cs)[u0 * 8 : (u0 + units) * 8]
        view = memoryview(raw)
        for first in range(0, units, _CHUNK_ENTRIES):
            chunk = view[first * 8 : (first + _CHUNK_ENTRIES) * 8]
            cbase = base + (u0 + first) * cs
            # 0x80 where the next entry does not continue an entry: at once with the test
            # that every entry is plain with COPIED set exactly on the data entries (the
            # usual case); else the same flags after testing for plain entries alone
            flags = Lanes.from_bytes(chunk).tagged_breaks(offset_bits, other_bits, cs)
            zeros = None
            if flags is None:
                found = _untagged_breaks(bytes(chunk), cs, zero_flags)
                if found is None:
                    return ("compressed clusters, reserved bits, unaligned clusters or zero "
                            "clusters of a version 2 image")
                flags, zeros = found
            # runs of entries, each ending at a flag (the last one may end at the chunk's
            # end): their guest bounds, and what each first entry says (0: unallocated)
            pieces = flags.split(b"\x80")
            tail = pieces.pop()
            sizes = [(len(p) + 1) * cs for p in pieces]
            if tail:
                sizes.append(len(tail) * cs)
            bounds = list(accumulate(sizes, initial=cbase))
            bounds.pop()
            hosts = [unpack(chunk, (g - cbase) >> shift)[0] & C.OFFSET_MASK or -1 for g in bounds]
            top = max(hosts)
            if top >= file_size:
                return "a data or zero cluster past the end of the file"
            # whether each run is of zero clusters (None: none is)
            zero = None if zeros is None else [zeros[(g - cbase) >> cluster_bits] for g in bounds]
            if sparse_host and (top >= 0 if zero is None else any(
                    h >= 0 and not z for h, z in zip(hosts, zero, strict=True))):
                # data clusters in a sparse host file: the heuristic decides, once
                if looks_preallocated(storage, header, file_size):
                    return ("a sparse host file that looks metadata-preallocated (or whose "
                            "refcounts are not read here)")
                sparse_host = False
            if cbase < pos:  # a start inside the first cluster: the run begins at the start
                cut = pos - cbase
                bounds[0] = pos
                sizes[0] -= cut
                if hosts[0] >= 0:
                    hosts[0] += cut
            # the first run may join the last extent
            _add(starts, lengths, offsets, zero_runs, bounds[0], sizes[0], hosts[0],
                 zero is not None and zero[0] == 1)
            if zero is not None:
                first_index = len(starts) - 1
                zero_runs += [first_index + i for i in flag_positions(bytes(zero), 1)]
            starts += bounds[1:]
            lengths += sizes[1:]
            offsets += hosts[1:]
        pos = bend
    if pos < end:
        _add(starts, lengths, offsets, zero_runs, pos, end - pos, -1, False)
    # the last cluster may reach past the end of the range
    lengths[-1] = min(lengths[-1], end - starts[-1])

    codes = [DATA if o >= 0 else UNALLOCATED for o in offsets]
    for i in zero_runs:
        codes[i] = ZERO
    if (DATA in codes if zero_runs else max(offsets) >= 0) and _refused_reftable(
            storage, header, file_size):
        return "refcount table entries that ops/map.py's refcount lookup refuses"
    return PlainExtents(starts, lengths, codes, offsets, name)


def _add(starts: list[int], lengths: list[int], offsets: list[int], zero_runs: list[int],
         a: int, length: int, host: int, zero: bool) -> None:
    """Append the extent of `length` bytes at a (host offset or -1; of zero clusters if
    `zero`), joined to the last one when qemu-img would join them: the same kind (zero or
    not), and both without an offset or contiguous in the file."""
    if starts and starts[-1] + lengths[-1] == a and zero == (
            bool(zero_runs) and zero_runs[-1] == len(starts) - 1):
        prev = offsets[-1]
        if (host < 0 and prev < 0) or (host >= 0 and prev >= 0 and prev + lengths[-1] == host):
            lengths[-1] += length
            return
    starts.append(a)
    lengths.append(length)
    offsets.append(host)
    if zero:
        zero_runs.append(len(starts) - 1)


def may_look_preallocated(storage: FileStorage, cs: int, file_size: int) -> bool:
    """Whether ops/map.py's metadata-preallocation heuristic could hold, which then splits
    data clusters by the host file's holes: it does when at least max(real * 10 // 9,
    real + 2) of the clusters before the end of the file have a nonzero refcount, `real`
    being the clusters the host file has allocated. At most every one of the file's clusters
    can count, so a file with fewer clusters than that threshold never looks preallocated,
    and no refcount needs to be read (a sparse host file: ops/map.py decides)."""
    real_clusters = storage.allocated_bytes() // cs
    threshold = max(real_clusters * 10 // 9, real_clusters + 2)
    return -(-file_size // cs) >= threshold


def looks_preallocated(storage: FileStorage, header: Header, file_size: int) -> bool:
    """Whether ops/map.py's metadata-preallocation heuristic holds: at least the threshold of
    may_look_preallocated of the clusters before the end of the file have a nonzero refcount
    (counted in the refcount blocks as ops/map.py's get_range reads them). True as well
    where this module does not read the refcounts exactly as that lookup: a refcount table
    it refuses, refcounts narrower than a byte, a refcount block cut by the end of the file."""
    if _refused_reftable(storage, header, file_size):
        return True
    cs = header.cluster_size
    bits = header.refcount_bits
    if bits < 8:
        return True
    end_cluster = -(-file_size // cs)
    per_block = cs * 8 // bits
    blocks = min(header.refcount_table_clusters * cs // 8, -(-end_cluster // per_block))
    table = struct.unpack(f">{blocks}Q", storage.pread(header.refcount_table_offset, blocks * 8))
    counted = 0
    for index, entry in enumerate(table):
        block = entry & ~C.REFT_RESERVED_MASK
        if not block:
            continue
        raw = storage.pread(block, cs)
        if len(raw) != cs:
            return True
        entries = min(per_block, end_cluster - index * per_block)
        counted += Lanes.from_bytes(raw[: entries * bits // 8], bits).nonzero().count(1)
    real_clusters = storage.allocated_bytes() // cs
    return counted >= max(real_clusters * 10 // 9, real_clusters + 2)


def _refused_reftable(storage: FileStorage, header: Header, file_size: int) -> bool:
    """Whether that heuristic's refcount lookup (run once data is found) would refuse the
    refcount table: an entry with reserved bits, unaligned, or past the end of the file,
    among the ones for the blocks that cover the file."""
    cs = header.cluster_size
    end_cluster = -(-file_size // cs)
    per_block = cs * 8 // header.refcount_bits
    blocks = min(header.refcount_table_clusters * cs // 8, -(-end_cluster // per_block))
    raw = storage.pread(header.refcount_table_offset, blocks * 8)
    limit = min(C.MAX_HOST_OFFSET, end_cluster * cs)
    low = (cs - 1) | C.REFT_RESERVED_MASK
    return any(entry & low or entry >= limit for entry in struct.unpack(f">{blocks}Q", raw))


__all__ = ["PlainExtents", "plain_map", "unusual", "walk_layer", "plain_entries", "may_look_preallocated",
           "looks_preallocated", "DATA", "UNALLOCATED", "ZERO"]
