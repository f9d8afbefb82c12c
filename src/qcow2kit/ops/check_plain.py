"""check_plain: the numpy-free fast path of `qcow2kit check` without repair. It PROVES an
image clean, or declines; the full check (ops/check.py over metadata/check/) does everything
else, including finding and wording every problem.

How: every reference the full check would count (header cluster, L1 table, the L2 tables,
their data clusters, refcount table, refcount blocks) is turned into runs of host clusters.
The refcount each cluster should have is then built as bytes, run by run, in the on-disk
refcount format; if no cluster was referenced twice, those bytes must equal the on-disk
refcount blocks (read as bytes, covering exactly the clusters the full check compares), and
every L1/L2 entry that holds an offset must carry the COPIED flag (its refcount is 1). The
L2 tables are checked a whole batch at a time with format/lanes.py; only the runs of
contiguous clusters are visited in Python. Image end offset, allocated, fragmented and total
clusters are counted exactly as metadata/check/walk.py and compare.py count them (QEMU's
semantics: a fragment is a cluster that does not follow the previous allocated cluster of
the same L2 table, unallocated entries in between are skipped).

Declines (returns None, having printed and written nothing) on anything it does not handle
or cannot prove: a header the full check would refuse or open specially, any incompatible,
compatible or autoclear feature bit (dirty, corrupt, lazy refcounts, external data file,
extended L2, bitmaps...), snapshots, refcounts narrower than 8 bits, compressed clusters,
reserved or misaligned bits, an offset at or past the end of the file, a cluster referenced
twice, any refcount that differs from the expected one, any I/O error.

Owns no output format (ops/check.py renders the result for both paths). Must never write,
never import numpy, qcow2kit.image, metadata.meta or metadata.check: their import alone
costs more than qemu-img's whole check of a 1 GiB image.
"""

from __future__ import annotations

import os
import struct

from ..errors import Qcow2Error
from ..format import constants as C
from ..format.header import Header
from ..format.lanes import Lanes
from ..io.file import FileStorage
from ..metadata.header_io import read_header

_ALL = (1 << 64) - 1
# L2 tables are read and checked in batches of this many bytes, into one reused buffer
_BATCH_BYTES = 256 << 10
# all-zero pieces of L2 tables (sparse images) are skipped with one comparison each
_PIECE_BYTES = 4096
# live pieces checked together: integers this small stay in the allocator's reused memory
# (larger ones are mapped afresh each time and cost page faults: measured twice as slow)
_GROUP_BYTES = 32 << 10


class CleanResult:
    """The numbers `qemu-img check` reports for an image found clean; the attribute names
    are CheckResult's, so ops/check.py renders both alike."""

    corruptions = leaks = check_errors = corruptions_fixed = leaks_fixed = compressed_clusters = 0
    exit_code = 0

    __slots__ = ("image_end_offset", "total_clusters", "allocated_clusters", "fragmented_clusters")

    def __init__(self, image_end_offset: int, total_clusters: int, allocated_clusters: int,
                 fragmented_clusters: int) -> None:
        self.image_end_offset = image_end_offset
        self.total_clusters = total_clusters
        self.allocated_clusters = allocated_clusters
        self.fragmented_clusters = fragmented_clusters


class _DeclinedError(Exception):
    """Something the fast path does not prove: the full check runs instead."""


def prove_clean(path: str, *, force_share: bool = False, repair: bool = False) -> CleanResult | None:
    """The check result of the qcow2 image at path if it is provably clean, else None (the
    caller then runs the full check, which also reports any error opening the file). The
    file is opened and locked exactly as the full check opens it: read-only, or read-write
    for a repair (which has nothing to do in a clean image, and writes nothing here)."""
    try:
        storage = FileStorage(path, repair, force_share=force_share)
    except Exception:  # the full check opens it again and reports the error in its words
        return None
    try:
        return prove(storage)
    finally:
        storage.close()


def prove(storage: FileStorage) -> CleanResult | None:
    """prove_clean over a storage already open (and locked); reads only."""
    try:
        return _prove(storage)
    except Exception:  # _DeclinedError, or anything unexpected: the full check decides
        return None


class _Expected:
    """The refcount every host cluster [0, n) should have, in the on-disk refcount format
    (big-endian, `width` bytes): 1 on every referenced run, 0 elsewhere."""

    def __init__(self, n: int, width: int) -> None:
        self.n = n
        self.width = width
        self.one = (1).to_bytes(width, "big")
        self.bytes = bytearray(n * width)
        self.total = 0  # clusters referenced, counting each reference
        self.top = 0  # one past the highest referenced cluster

    def add(self, first: int, count: int) -> None:
        end = first + count
        if first < 0 or end > self.n:
            raise _DeclinedError("reference outside the file")
        w = self.width
        self.bytes[first * w : end * w] = self.one * count
        self.total += count
        if end > self.top:
            self.top = end

    def add_clusters(self, clusters: list[int]) -> None:
        """One reference to each of these clusters."""
        if not clusters:
            return
        if max(clusters) >= self.n:
            raise _DeclinedError("reference outside the file")
        w, one, ref = self.width, self.one, self.bytes
        for c in clusters:
            ref[c * w : c * w + w] = one
        self.total += len(clusters)
        self.top = max(self.top, max(clusters) + 1)

    def no_double_reference(self) -> bool:
        # each 1 of `one` is its only nonzero byte: a cluster set twice is counted once here
        return self.bytes.count(1) == self.total


def plain_header(storage: FileStorage, file_len: int) -> Header:
    """The header (metadata/header_io's read_header, the full check's reader), if it has
    nothing the fast path leaves to the full check: no feature bit, compression type,
    snapshot, encryption or crypto extension, refcounts of 8 bits or more, tables where the
    full check opens the image specially. Declines otherwise."""
    try:
        header = read_header(storage)
    except (Qcow2Error, OSError) as exc:
        raise _DeclinedError(f"header: {exc}") from None
    if header.incompatible_features or header.compatible_features or header.autoclear_features:
        raise _DeclinedError("feature bits")
    if header.compression_type or header.crypt_method or header.extension(C.EXT_CRYPTO) is not None:
        raise _DeclinedError("compression type or encryption")
    if header.nb_snapshots or not 3 <= header.refcount_order <= 6:
        raise _DeclinedError("snapshots or narrow refcounts")
    cs = header.cluster_size
    l1_offset, l1_size = header.l1_table_offset, header.l1_size
    rt_offset, rt_clusters = header.refcount_table_offset, header.refcount_table_clusters
    if any(off % cs or off >= C.MAX_HOST_OFFSET for off in (l1_offset, rt_offset, header.snapshots_offset)):
        raise _DeclinedError("table offset")
    if l1_size * 8 > C.MAX_L1_BYTES or not 0 < rt_clusters * cs <= C.MAX_REFTABLE_BYTES:
        raise _DeclinedError("table size")
    needed = -(-header.size // (cs * (cs // 8)))
    if needed > 0x7FFFFFFF or l1_size < needed:
        raise _DeclinedError("virtual size")
    if l1_size and (l1_offset == 0 or l1_offset + l1_size * 8 > file_len):
        raise _DeclinedError("L1 table outside the file")
    if rt_offset == 0 or rt_offset + rt_clusters * cs > file_len:
        raise _DeclinedError("refcount table outside the file")
    return header


def _prove(storage: FileStorage) -> CleanResult:
    file_len = storage.size()
    header = plain_header(storage, file_len)
    cb = header.cluster_bits
    cs = 1 << cb
    n = -(-file_len // cs)
    exp = _Expected(n, 1 << (header.refcount_order - 3))
    exp.add(0, 1)  # the header
    aligned = C.OFFSET_MASK & ~(cs - 1)

    l2_offsets: list[int] = []
    if header.l1_size:
        l1_offset, l1_bytes = header.l1_table_offset, header.l1_size * 8
        exp.add(l1_offset >> cb, ((l1_offset + l1_bytes - 1) >> cb) - (l1_offset >> cb) + 1)
        raw = storage.pread(l1_offset, l1_bytes)
        zero = bytes(_PIECE_BYTES)
        for a in range(0, l1_bytes, _PIECE_BYTES):
            part = raw[a : a + _PIECE_BYTES]
            if raw.startswith(zero[: len(part)], a):
                continue  # unallocated (most of a large sparse image's L1)
            # every entry is 0, or COPIED | an aligned nonzero offset (nothing else)
            if not Lanes.from_bytes(part).tagged(aligned, _ALL & ~aligned, C.OFLAG_COPIED):
                raise _DeclinedError("L1 entry with flags other than COPIED")
            copied = C.OFLAG_COPIED
            l2_offsets += [e ^ copied for e in struct.unpack(f">{len(part) // 8}Q", part) if e]
        if l2_offsets and max(l2_offsets) >= file_len:
            raise _DeclinedError("L2 table past the end of the file")
        exp.add_clusters([off >> cb for off in l2_offsets])
    allocated, fragmented = _data_runs(storage, l2_offsets, cs, exp)

    rt_offset = header.refcount_table_offset
    rt_bytes = header.refcount_table_clusters * cs
    exp.add(rt_offset >> cb, header.refcount_table_clusters)
    reftable = struct.unpack(f">{rt_bytes // 8}Q", storage.pread(rt_offset, rt_bytes))
    blocks = [entry for entry in reftable if entry]
    if any(entry & (C.REFT_RESERVED_MASK | (cs - 1)) for entry in blocks):
        raise _DeclinedError("refcount table entry unaligned or with reserved bits")
    exp.add_clusters([entry >> cb for entry in blocks])
    if not exp.no_double_reference():
        raise _DeclinedError("a cluster referenced twice")
    if _disk_refcounts(storage, reftable, n, exp.width, cs) != exp.bytes:
        raise _DeclinedError("refcounts differ")
    return CleanResult(exp.top * cs, -(-header.size // cs), allocated, fragmented)


def _disk_refcounts(storage: FileStorage, reftable: tuple[int, ...], n: int, width: int,
                    cs: int) -> bytearray:
    """The on-disk refcounts of clusters [0, n) as bytes (no block: zeros), as the full
    check reads them: refcount blocks past those that cover the file are not read."""
    blocks = reftable[: -(-n // (cs // width))]
    out = bytearray(max(len(blocks) * cs, n * width))
    _read_into(storage, memoryview(out), list(blocks), cs)
    del out[n * width :]
    return out


def _data_runs(storage: FileStorage, l2_offsets: list[int], cs: int, exp: _Expected) -> tuple[int, int]:
    """Check the L2 tables at l2_offsets (in L1 order) and add their data clusters to exp;
    (allocated clusters, fragmented clusters) as the full check counts them."""
    if not l2_offsets:
        return 0, 0
    piece = min(cs, _PIECE_BYTES)
    pieces_per_table = cs // piece
    per_group = _GROUP_BYTES // piece
    zero_piece = bytes(piece)
    per_batch = max(1, _BATCH_BYTES // cs)
    buf = bytearray(min(len(l2_offsets), per_batch) * cs)
    view = memoryview(buf)
    state = _Runs(cs, len(l2_offsets) * cs // 8)
    for lo in range(0, len(l2_offsets), per_batch):
        batch = l2_offsets[lo : lo + per_batch]
        _read_into(storage, view, batch, cs)
        # the pieces that hold anything; all-zero ones (sparse tables) are skipped
        count = len(batch) * cs // piece
        live = [p for p in range(count) if not buf.startswith(zero_piece, p * piece)]
        for g in range(0, len(live), per_group):
            group = live[g : g + per_group]
            if group[-1] - group[0] == len(group) - 1:
                data: memoryview | bytes = view[group[0] * piece : (group[-1] + 1) * piece]
            else:
                data = b"".join([view[p * piece : (p + 1) * piece] for p in group])
            tables = [lo + p // pieces_per_table for p in group]
            scanned = (lo * pieces_per_table + group[-1] + 1) * (piece // 8)
            _group_runs(data, piece // 8, tables, scanned, exp, state)
    return state.allocated, state.fragmented


class _Runs:
    """What the runs of L2 entries seen so far add up to: allocated and fragmented clusters,
    where the last run ended, and how many runs there were (each costs Python time: an image
    whose clusters are scattered one by one is left to the vectorised full check)."""

    def __init__(self, cs: int, total_entries: int) -> None:
        self.cs = cs
        self.aligned = C.OFFSET_MASK & ~(cs - 1)
        self.allocated = 0
        self.fragmented = 0
        self.table = -1
        self.end = 0  # host offset just past the last allocated cluster of `table`
        self.runs = 0
        self.total_entries = total_entries
        # past this many runs the full check is faster (measured: ~1 us per run here; the
        # full check costs ~40 ms more to start plus ~0.06 us per entry more)
        self.budget = _RUNS_FREE + total_entries // 16

    def afford(self, more: int, scanned: int) -> bool:
        """Whether the runs projected for the whole image, at the rate seen over the first
        `scanned` entries (with `more` runs to come in them), stay within the budget."""
        self.runs += more
        return self.runs <= _RUNS_EVIDENCE or self.runs * self.total_entries <= self.budget * scanned


# runs always worth visiting, and the count below which the projection is not trusted
_RUNS_FREE = 40_000
_RUNS_EVIDENCE = 4096


# L2 entries are 0, the zero flag alone, or COPIED | aligned offset (| the zero flag): COPIED
# exactly where an offset is (its refcount is then proven to be 1), no other bit; these are
# the bits that must be zero (with those of the offset field below the cluster size)
_FLAGS_ZERO = _ALL >> 1 & ~C.OFLAG_ZERO


def _group_runs(data: memoryview | bytes, piece_entries: int, tables: list[int], scanned: int,
                exp: _Expected, state: _Runs) -> None:
    """The runs of contiguous clusters of some pieces of L2 tables (piece k of `data` belongs
    to table tables[k]; they end entry `scanned` of all tables), added to exp and counted in
    state."""
    cs, aligned = state.cs, state.aligned
    if piece_entries >= _WHOLE_MIN_ENTRIES and _whole_pieces(data, piece_entries, tables, scanned, exp, state):
        return
    breaks = Lanes.from_bytes(data).tagged_breaks(aligned, _FLAGS_ZERO & ~aligned, cs)
    if breaks is None:
        raise _DeclinedError("L2 entry with reserved bits, compressed, or without COPIED")
    marks = bytearray(breaks)
    marks[piece_entries - 1 :: piece_entries] = b"\x80" * len(tables)  # runs end with pieces
    if not state.afford(marks.count(0x80), scanned):
        raise _DeclinedError("clusters too scattered: the full check is faster")
    find = marks.find
    cb = cs.bit_length() - 1
    width, one, ref = exp.width, exp.one, exp.bytes
    last_table, last_end, allocated, fragmented, top = state.table, state.end, 0, 0, exp.top
    start = 0
    end = find(0x80)
    while end >= 0:
        host = int.from_bytes(data[start * 8 : start * 8 + 8], "big") & aligned
        if host:  # a run of allocated clusters (else of unallocated entries)
            count = end - start + 1
            table = tables[start // piece_entries]
            if table == last_table and host != last_end:
                fragmented += 1
            last_table = table
            last_end = host + count * cs
            allocated += count
            first = host >> cb
            if first + count > top:
                top = first + count
            ref[first * width : (first + count) * width] = one * count
        start = end + 1
        end = find(0x80, start)
    if top > exp.n:
        raise _DeclinedError("data cluster past the end of the file")
    exp.top = top
    exp.total += allocated
    state.table, state.end = last_table, last_end
    state.allocated += allocated
    state.fragmented += fragmented


def _whole_pieces(data: memoryview | bytes, piece_entries: int, tables: list[int], scanned: int,
                  exp: _Expected, state: _Runs) -> bool:
    """The usual pieces of a dense image, each one run of allocated clusters (COPIED | an
    aligned offset, the next cluster in every entry), checked with a few operations each;
    False (nothing counted) unless every piece is one, and the caller checks them entry by
    entry instead."""
    cs, aligned = state.cs, state.aligned
    size = piece_entries * 8
    limit = C.MAX_HOST_OFFSET - piece_entries * cs  # the last entry's offset stays in its field
    hosts = []
    for k in range(len(tables)):
        part = data[k * size : (k + 1) * size]
        first = int.from_bytes(part[:8], "big")
        host = first & aligned
        if first != C.OFLAG_COPIED | host or not host or host > limit:
            return False
        if not Lanes.from_bytes(part).progression(cs):
            return False
        hosts.append(host)
    if not state.afford(len(hosts), scanned):
        raise _DeclinedError("clusters too scattered: the full check is faster")
    cb = cs.bit_length() - 1
    width, one = exp.width, exp.one
    ones = one * piece_entries
    for host, table in zip(hosts, tables, strict=True):
        if table == state.table and host != state.end:
            state.fragmented += 1
        state.table = table
        state.end = host + piece_entries * cs
        first = host >> cb
        if first + piece_entries > exp.n:
            raise _DeclinedError("data cluster past the end of the file")
        exp.bytes[first * width : (first + piece_entries) * width] = ones
        exp.top = max(exp.top, first + piece_entries)
    state.allocated += len(hosts) * piece_entries
    exp.total += len(hosts) * piece_entries
    return True


# pieces of at least this many entries are first tried as one run each
_WHOLE_MIN_ENTRIES = 512


def _read_into(storage: FileStorage, view: memoryview, offsets: list[int], cs: int) -> None:
    """The clusters at offsets into view, one after another, 0 meaning none (its part of
    view is left as it is); one preadv per run of clusters adjacent in the file (past the
    end of the file: zeros, as the full check reads)."""
    fd = storage.fd
    i = 0
    k = len(offsets)
    while i < k:
        if not offsets[i]:
            i += 1
            continue
        j = i + 1
        while j < k and offsets[j] == offsets[j - 1] + cs:
            j += 1
        part = view[i * cs : j * cs]
        if os.preadv(fd, [part], offsets[i]) != len(part):
            part[:] = storage.pread(offsets[i], len(part))
        i = j


__all__ = ["CleanResult", "prove", "prove_clean"]
