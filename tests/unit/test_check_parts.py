"""Unit tests of the pieces the checker is built from: snapshot entries decoded one at a
time (format.snapshot.iter_snapshot_entries), the header read for a check only
(metadata.check.opening), Refcounts.set_values, which the check's repair uses for
refcounts too large for signed arithmetic, the check's batched cluster reads and its JSON
summary (written without the json module in the usual case)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from qcow2kit.errors import CorruptionError, FormatError
from qcow2kit.format import constants as C
from qcow2kit.format.snapshot import (
    RawSnapshotEntry,
    Snapshot,
    SnapshotExtraTooLargeError,
    iter_snapshot_entries,
    parse_snapshots,
    snapshot_table_bytes,
)
from qcow2kit.io.memory import MemoryStorage
from qcow2kit.metadata.check.opening import open_for_check, read_header_for_check
from tests.helpers import image_in_memory, qemu_img, qemu_io, refcounts_of

# ---- snapshot entries ------------------------------------------------------------------------


def _snap(i: int, extra: bytes) -> Snapshot:
    return Snapshot(
        (i + 3) << 16, 8, str(i), f"snap-{i}-\u00e9", 1000 + i, 7, 99 * i, 4096 * i, extra
    )


def _reader(buf: bytes, offset: int, reads: list[tuple[int, int]]) -> Callable[[int, int], bytes]:
    def read(pos: int, n: int) -> bytes:
        reads.append((pos, n))
        rel = pos - offset
        return buf[rel : rel + n] + b"\0" * max(0, rel + n - len(buf))

    return read


def test_entries_match_the_strict_parser_and_encode_back() -> None:
    snaps = [_snap(0, b""), _snap(1, bytes(range(16))), _snap(2, b"\x01" * 24)]
    table = snapshot_table_bytes(snaps)
    offset = 0x50000
    entries = list(iter_snapshot_entries(_reader(table, offset, []), offset, 3, trim_extra=False))
    strict = parse_snapshots(table, 3, 65536)
    assert [e.to_bytes() for e in entries] == [s.to_bytes() for s in snaps]
    for e, s in zip(entries, strict, strict=True):
        assert (e.l1_table_offset, e.l1_size, e.id_str, e.name) == (
            s.l1_table_offset, s.l1_size, s.id_str, s.name)
        assert (e.date_sec, e.date_nsec, e.vm_clock_nsec, e.vm_state_size, e.extra_data) == (
            s.date_sec, s.date_nsec, s.vm_clock_nsec, s.vm_state_size, s.extra_data)
    # `end` is just past each name, before the padding; the last one ends the table
    assert entries[-1].end - offset == len(snaps[2].to_bytes().rstrip(b"\0")) + sum(
        len(s.to_bytes()) for s in snaps[:2])
    assert entries[0].raw_name == "snap-0-\u00e9".encode()


def _oversized(extra_len: int) -> bytes:
    fixed = Snapshot.FIXED.pack(0x30000, 1, 1, 1, 0, 0, 0, 0, extra_len)
    return fixed + b"\xaa" * extra_len + b"ab"


def test_too_much_extra_data_stops_before_the_names_are_read() -> None:
    big = C.MAX_SNAPSHOT_EXTRA_BYTES + 8
    table = _oversized(big)
    reads: list[tuple[int, int]] = []
    it = iter_snapshot_entries(_reader(table, 0, reads), 0, 1, trim_extra=False)
    with pytest.raises(SnapshotExtraTooLargeError) as err:
        next(it)
    assert err.value.index == 0 and err.value.size == big
    assert isinstance(err.value, FormatError)
    assert reads == [(0, Snapshot.FIXED.size)]


def test_trimmed_extra_data_keeps_the_declared_size() -> None:
    big = C.MAX_SNAPSHOT_EXTRA_BYTES + 8
    table = _oversized(big)
    (entry,) = iter_snapshot_entries(_reader(table, 0, []), 0, 1, trim_extra=True)
    assert isinstance(entry, RawSnapshotEntry)
    assert entry.extra_data_size == big
    assert entry.extra_data == b"\xaa" * C.MAX_SNAPSHOT_EXTRA_BYTES
    assert (entry.raw_id, entry.raw_name) == (b"a", b"b")
    assert entry.end == len(table)


def test_entries_are_decoded_lazily() -> None:
    table = snapshot_table_bytes([_snap(0, b"x" * 16), _snap(1, b"y" * 16)])
    reads: list[tuple[int, int]] = []
    it = iter_snapshot_entries(_reader(table, 0, reads), 0, 2, trim_extra=False)
    next(it)
    first = len(reads)
    assert all(pos < len(_snap(0, b"x" * 16).to_bytes()) for pos, _n in reads)
    next(it)
    assert len(reads) > first


# ---- the header for a check --------------------------------------------------------------------
@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "4M")
    qemu_io(path, "write -P 3 0 128k")
    return path


def _poke(path: Path, offset: int, data: bytes) -> MemoryStorage:
    buf = bytearray(path.read_bytes())
    buf[offset : offset + len(data)] = data
    return MemoryStorage(bytes(buf), name="poked", writable=False)


def test_missing_table_is_read_with_its_real_fields(image: Path) -> None:
    storage = _poke(image, C.HEADER_REFTABLE_OFFSET + 8, struct.pack(">I", 0))
    header = read_header_for_check(storage)
    assert header.refcount_table_clusters == 0
    assert header.refcount_table_offset != 0
    meta = open_for_check(storage)
    assert len(meta.refcounts.reftable) == 0

    storage = _poke(image, C.HEADER_REFTABLE_OFFSET, struct.pack(">Q", 0))
    header = read_header_for_check(storage)
    assert header.refcount_table_offset == 0 and header.refcount_table_clusters == 1


def test_other_header_errors_are_still_refused(image: Path) -> None:
    # a refcount table that is present but lies past the end of the file
    storage = _poke(image, C.HEADER_REFTABLE_OFFSET, struct.pack(">QI", 1 << 30, 1))
    with pytest.raises(FormatError, match="refcount_table_offset"):
        read_header_for_check(storage)
    # a missing table does not excuse a broken L1 pointer
    buf = bytearray(image.read_bytes())
    buf[C.HEADER_REFTABLE_OFFSET + 8 : C.HEADER_REFTABLE_OFFSET + 12] = struct.pack(">I", 0)
    buf[40:48] = struct.pack(">Q", 1 << 40)
    with pytest.raises(FormatError, match="l1_table_offset"):
        read_header_for_check(MemoryStorage(bytes(buf), name="x", writable=False))
    # and a file that is not qcow2 at all
    with pytest.raises(FormatError):
        read_header_for_check(MemoryStorage(b"\0" * 4096, name="zeros", writable=False))


# ---- Refcounts.set_values ----------------------------------------------------------------------
def test_set_values_takes_64_bit_refcounts_and_reports_freed(tmp_path: Path) -> None:
    path = tmp_path / "rc64.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=64", str(path), "4M")
    qemu_io(path, "write -P 3 0 192k")
    img = image_in_memory(path)
    try:
        rc = refcounts_of(img)
        clusters = np.array([5, 6, 7], dtype=np.int64)
        huge = np.array([(1 << 64) - 1, 1 << 63, 1], dtype=np.uint64)
        assert len(rc.set_values(clusters, huge)) == 0
        assert rc.values(clusters).tolist() == [(1 << 64) - 1, 1 << 63, 1]
        freed = rc.set_values(clusters, np.array([0, 1, 0], dtype=np.uint64))
        assert freed.tolist() == [5, 7]
        assert rc.values(clusters).tolist() == [0, 1, 0]
    finally:
        img.close()


def test_set_values_refuses_more_than_the_width(tmp_path: Path) -> None:
    path = tmp_path / "rc16.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "4M")
    img = image_in_memory(path)
    try:
        with pytest.raises(CorruptionError, match="overflow"):
            refcounts_of(img).set_values(
                np.array([1], dtype=np.int64), np.array([1 << 16], dtype=np.uint64))
    finally:
        img.close()


# ---- cluster reads and the JSON summary ------------------------------------------------------


def test_cluster_reads_match_one_pread_per_cluster(tmp_path: Path) -> None:
    """Sorted runs read with preadv (file) and cluster by cluster (other storage) give the
    same rows as one pread each: unsorted offsets, adjacent runs longer than one preadv
    takes, duplicates, unaligned offsets and clusters past the end of the file."""
    from qcow2kit.io.file import FileStorage
    from qcow2kit.metadata.check.state import CheckState

    path = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(path), "2M")
    qemu_io(path, "write -P 7 0 1M")
    size = path.stat().st_size
    cs = 512
    rng = np.random.default_rng(16)
    offsets = np.concatenate(
        [
            np.arange(0, 1100 * cs, cs),  # one run longer than 1,024 buffers
            rng.integers(0, size // cs + 4, 300) * cs,  # scattered, some past the end
            [777, 777, size - 100, size + 3 * cs],
        ]
    ).astype(np.int64)
    rng.shuffle(offsets)
    file_storage = FileStorage(str(path), False)
    memory = MemoryStorage(path.read_bytes(), name="mem", writable=False)
    try:
        for storage in (file_storage, memory):
            st = CheckState(open_for_check(storage), 0)
            expect = [storage.pread(int(o), cs) for o in offsets]
            for scratch in (False, True, True):
                rows = st.read_clusters(offsets, scratch=scratch)
                assert [bytes(r) for r in rows] == expect
    finally:
        file_storage.close()


@pytest.mark.parametrize(
    "name", ["a.qcow2", "/tmp/x y/z.qcow2", 'quo"te\\back', "tab\tnew\nline", "\u00e9\U0001f600", "\udcff", ""]
)
def test_json_summary_is_what_json_dumps_writes(name: str) -> None:
    import json

    from qcow2kit.metadata.check import CheckResult
    from qcow2kit.ops.check import to_json, to_json_dict

    result = CheckResult(corruptions=2, image_end_offset=1 << 40, total_clusters=9, allocated_clusters=4)
    for fmt in ("qcow2", "raw"):
        assert to_json(result, name, fmt) == json.dumps(to_json_dict(result, name, fmt), indent=4) + "\n"


@pytest.mark.parametrize("repair", [None, "all"])
def test_copied_check_reads_the_tables_again_when_they_were_not_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, repair: str | None
) -> None:
    """The COPIED check over tables it reads again (too many entries to keep from the
    refcount pass) reports and repairs exactly what it does over the kept ones."""
    from qcow2kit.metadata.check import state
    from qcow2kit.ops.check import check_path
    from tests.helpers import layout

    results = []
    for keep in (state.ACTIVE_KEEP_ENTRIES, 0):
        path = tmp_path / f"copied-{keep}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(path), "64M")
        qemu_io(path, "write -P 1 0 1M", "write -P 2 40M 64k")
        l1 = layout(path)["l1"]
        with open(path, "r+b") as f:
            for entry, slot in ((l1[0], 3), (l1[0], 200), (l1[-1] or l1[0], 9)):
                pos = (entry & C.OFFSET_MASK) + 8 * slot
                f.seek(pos)
                (word,) = struct.unpack(">Q", f.read(8))
                f.seek(pos)
                f.write(struct.pack(">Q", word & ~C.OFLAG_COPIED))
        monkeypatch.setattr(state, "ACTIVE_KEEP_ENTRIES", keep)
        res = check_path(str(path), repair)
        results.append((res.corruptions, res.corruptions_fixed, res.messages, res.recheck_messages))
    assert results[0][0] + results[0][1] == 3
    assert results[0] == results[1]
