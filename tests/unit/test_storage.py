"""One conformance suite for every Storage implementation (io.storage.Storage): FileStorage,
MemoryStorage, and the test storages in qcow2kit.testing that stand in for them
(RecordingStorage, FaultyStorage with no fault armed). What the protocol promises:

- pread returns exactly `length` bytes; bytes past the end read as zeros;
- pwrite past the end extends the storage (the gap reads zeros); it takes bytes, bytearray and
  memoryview (also a non-contiguous-from-zero slice);
- truncate cuts or extends with zeros; punch_hole zeroes a range without changing the size;
  allocate reserves space without changing what any byte reads;
- flush and event(name) change nothing that can be read;
- storage opened read-only refuses every change with ImageStateError and stays unchanged;
- close may be called twice.

Then the behaviour specific to each implementation: FileStorage reaches the file, refuses
reads far outside any file, and locks like QEMU; RecordingStorage's log replays to its
contents; FaultyStorage fails exactly where it is told to.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qcow2kit.errors import CorruptionError, ImageStateError
from qcow2kit.io.file import FileStorage
from qcow2kit.io.memory import MemoryStorage
from qcow2kit.io.storage import Storage
from qcow2kit.testing import FaultyStorage, RecordingStorage, crash_images
from tests.helpers import pattern

Factory = Callable[[bytes, bool], Storage]
INITIAL = pattern(1, 10_000)


@pytest.fixture(params=["file", "memory", "recording", "faulty"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """make(initial, writable) -> a storage holding `initial`."""
    opened: list[Storage] = []

    def factory(initial: bytes, writable: bool = True) -> Storage:
        kind = request.param
        s: Storage
        if kind == "file":
            path = tmp_path / f"s{len(opened)}.img"
            path.write_bytes(initial)
            s = FileStorage(str(path), writable)
        elif kind == "memory":
            s = MemoryStorage(initial, writable=writable)
        elif kind == "recording":
            s = RecordingStorage(initial, writable=writable)
        else:
            s = FaultyStorage(initial, writable=writable)
        opened.append(s)
        return s

    yield factory
    for s in opened:
        s.close()


def contents(s: Storage) -> bytes:
    return s.pread(0, s.size())


# ---- reading ----------------------------------------------------------------------------------
def test_implements_every_protocol_member(make: Factory) -> None:
    members = [n for n in vars(Storage) if not n.startswith("_")]
    members += list(Storage.__annotations__)
    s = make(INITIAL, True)
    missing = [n for n in members if not hasattr(s, n)]
    assert not missing, f"{type(s).__name__} lacks {missing}"
    assert {"pread", "pwrite", "flush", "truncate", "size", "punch_hole", "close", "event"} <= set(members)


def test_identity(make: Factory) -> None:
    rw, ro = make(INITIAL, True), make(INITIAL, False)
    assert isinstance(rw.name, str) and rw.name
    assert rw.writable is True and ro.writable is False
    assert rw.size() == ro.size() == len(INITIAL)


def test_pread_inside(make: Factory) -> None:
    s = make(INITIAL, False)
    for offset, length in [(0, 1), (0, len(INITIAL)), (4095, 2), (9999, 1), (123, 4567), (5, 0)]:
        got = s.pread(offset, length)
        assert isinstance(got, bytes)
        assert got == INITIAL[offset : offset + length]


@pytest.mark.parametrize("offset,length", [(9990, 20), (10_000, 1), (10_000, 4096), (1 << 20, 512)])
def test_pread_past_eof_reads_zeros(make: Factory, offset: int, length: int) -> None:
    s = make(INITIAL, False)
    got = s.pread(offset, length)
    inside = INITIAL[offset : offset + length]
    assert got == inside + bytes(length - len(inside))
    assert s.size() == len(INITIAL)  # reading never extends


def test_empty_storage(make: Factory) -> None:
    s = make(b"", True)
    assert s.size() == 0
    assert s.pread(0, 100) == bytes(100)


# ---- writing ----------------------------------------------------------------------------------
def test_pwrite_inside(make: Factory) -> None:
    s = make(INITIAL, True)
    s.pwrite(100, b"abc")
    assert s.size() == len(INITIAL)
    assert contents(s) == INITIAL[:100] + b"abc" + INITIAL[103:]


def test_pwrite_extends_with_a_zero_gap(make: Factory) -> None:
    s = make(INITIAL, True)
    s.pwrite(20_000, b"tail")
    assert s.size() == 20_004
    assert s.pread(len(INITIAL), 10_000) == bytes(10_000)
    assert s.pread(20_000, 8) == b"tail" + bytes(4)
    assert s.pread(0, len(INITIAL)) == INITIAL


def test_pwrite_across_eof(make: Factory) -> None:
    s = make(INITIAL, True)
    s.pwrite(9998, b"wxyz")
    assert s.size() == 10_002
    assert s.pread(9996, 6) == INITIAL[9996:9998] + b"wxyz"


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "slice"])
def test_pwrite_buffer_types(make: Factory, kind: str) -> None:
    s = make(INITIAL, True)
    data = pattern(2, 3000)
    buf: bytes | bytearray | memoryview
    if kind == "bytes":
        buf = data
    elif kind == "bytearray":
        buf = bytearray(data)
    elif kind == "memoryview":
        buf = memoryview(data)
    else:
        buf = memoryview(b"x" * 7 + data + b"y" * 5)[7:-5]
    s.pwrite(500, buf)
    assert s.pread(500, 3000) == data
    assert s.pread(0, 500) == INITIAL[:500]
    assert s.pread(3500, 6500) == INITIAL[3500:]


def test_truncate_shrinks_and_grows_with_zeros(make: Factory) -> None:
    s = make(INITIAL, True)
    s.truncate(4000)
    assert s.size() == 4000
    assert s.pread(0, 5000) == INITIAL[:4000] + bytes(1000)
    s.truncate(8192)
    assert s.size() == 8192
    assert contents(s) == INITIAL[:4000] + bytes(4192)  # the cut bytes do not come back
    s.truncate(0)
    assert s.size() == 0


def test_punch_hole(make: Factory) -> None:
    s = make(INITIAL, True)
    s.punch_hole(4096, 4096)
    assert s.size() == len(INITIAL)
    assert contents(s) == INITIAL[:4096] + bytes(4096) + INITIAL[8192:]
    s.punch_hole(100, 0)  # nothing
    assert contents(s) == INITIAL[:4096] + bytes(4096) + INITIAL[8192:]


def test_punch_hole_past_eof_does_not_extend(make: Factory) -> None:
    s = make(INITIAL, True)
    s.punch_hole(8192, 1 << 20)
    assert s.size() == len(INITIAL)
    assert contents(s) == INITIAL[:8192] + bytes(len(INITIAL) - 8192)


def test_allocate_keeps_contents(make: Factory) -> None:
    s = make(INITIAL, True)
    s.allocate(0, 8192)
    assert contents(s) == INITIAL
    s.allocate(8192, 8192)  # past the end: extends with zeros
    assert s.size() >= 16384
    assert s.pread(0, 16384) == INITIAL + bytes(16384 - len(INITIAL))
    assert s.allocated_bytes() >= 0


def test_flush_and_event_change_nothing(make: Factory) -> None:
    s = make(INITIAL, True)
    s.pwrite(0, b"head")
    s.flush()
    s.event("l2_update")
    assert contents(s) == b"head" + INITIAL[4:]
    ro = make(INITIAL, False)
    ro.flush()  # flushing read-only storage is allowed (nothing to do)
    ro.event("l1_update")
    assert contents(ro) == INITIAL


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.pwrite(0, b"x"),
        lambda s: s.pwrite(1 << 20, b"x"),
        lambda s: s.truncate(10),
        lambda s: s.truncate(1 << 20),
        lambda s: s.punch_hole(0, 4096),
        lambda s: s.allocate(0, 1 << 20),
    ],
    ids=["pwrite", "pwrite-past-eof", "truncate-down", "truncate-up", "punch_hole", "allocate"],
)
def test_read_only_refuses_changes(make: Factory, change: Callable[[Storage], None]) -> None:
    s = make(INITIAL, False)
    with pytest.raises(ImageStateError, match="read-only"):
        change(s)
    assert contents(s) == INITIAL


def test_close_twice(make: Factory) -> None:
    s = make(INITIAL, True)
    s.close()
    s.close()


# ---- FileStorage ------------------------------------------------------------------------------
def test_file_changes_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(INITIAL)
    s = FileStorage(str(path), True)
    s.pwrite(20_000, b"end")
    s.punch_hole(0, 4096)
    s.truncate(20_002)
    s.flush()
    s.close()
    assert path.read_bytes() == bytes(4096) + INITIAL[4096:] + bytes(10_000) + b"en"


def test_file_create_empties_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(INITIAL)
    s = FileStorage(str(path), True, create=True)
    assert s.size() == 0
    s.close()
    assert path.read_bytes() == b""


def test_file_punch_hole_frees_blocks(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    s = FileStorage(str(path), True, create=True)
    s.pwrite(0, pattern(3, 1 << 20))
    s.flush()
    before = s.allocated_bytes()
    assert before >= 1 << 20
    s.punch_hole(0, 1 << 20)
    after = s.allocated_bytes()
    s.close()
    # like QEMU, punching is only an optimisation: where the file system cannot, nothing
    # changes; where it can, the blocks are gone
    assert after == before or after < 1 << 20
    assert os.path.getsize(path) == 1 << 20


@pytest.mark.parametrize("offset,length", [(-1, 10), (0, -1), ((1 << 63) - 10, 20), (0, 1 << 40)])
def test_file_refuses_reads_outside_any_file(tmp_path: Path, offset: int, length: int) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(INITIAL)
    s = FileStorage(str(path), False)
    try:
        with pytest.raises(CorruptionError):
            s.pread(offset, length)
    finally:
        s.close()


def test_file_read_only_open_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileStorage(str(tmp_path / "missing.img"), False)


def test_file_locks_conflict_like_qemu(tmp_path: Path) -> None:
    """A second writer is refused; readers may share with each other (OFD locks, so this
    works inside one process as between processes)."""
    from qcow2kit.errors import LockError

    path = tmp_path / "f.img"
    path.write_bytes(INITIAL)
    r1 = FileStorage(str(path), False)
    r2 = FileStorage(str(path), False)
    try:
        with pytest.raises(LockError, match="lock"):
            FileStorage(str(path), True)
    finally:
        r1.close()
        r2.close()
    w = FileStorage(str(path), True)
    try:
        with pytest.raises(LockError):
            FileStorage(str(path), False)
        FileStorage(str(path), False, force_share=True).close()
        FileStorage(str(path), False, lock=False).close()
    finally:
        w.close()
    FileStorage(str(path), True).close()  # closing released the locks


# ---- RecordingStorage -------------------------------------------------------------------------
def test_recording_log_replays_to_the_contents() -> None:
    s = RecordingStorage(INITIAL)
    s.pwrite(5, b"abc")
    s.event("l2_update")
    s.pwrite(12_000, b"def")
    s.flush()
    s.punch_hole(0, 4)
    s.allocate(15_000, 100)
    s.truncate(14_000)
    assert [e[0] for e in s.log] == ["write", "event", "write", "flush", "punch", "allocate",
                                     "truncate"]
    assert [e[0] for e in s.ops] == ["write", "write", "flush", "punch", "allocate", "truncate"]
    states = list(crash_images(s.initial, s.log))
    label, last = states[-1]
    assert last == s.contents() and label.startswith("prefix 6/6")
    assert states[0][1] == INITIAL
    s.restart()
    assert s.log == [] and s.initial == s.contents()


def test_recording_from_file(tmp_path: Path) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(INITIAL)
    s = RecordingStorage.from_file(path)
    s.pwrite(0, b"x")
    assert path.read_bytes() == INITIAL  # the file itself is never touched
    assert s.contents() == b"x" + INITIAL[1:] and s.name == str(path)


# ---- FaultyStorage ----------------------------------------------------------------------------
def test_faulty_fails_the_nth_write_only() -> None:
    s = FaultyStorage(INITIAL, fail_write_at=2, error=errno.EIO)
    s.pwrite(0, b"a")
    with pytest.raises(OSError) as exc:
        s.pwrite(1, b"b")
    assert exc.value.errno == errno.EIO and s.failed
    s.pwrite(2, b"c")  # not sticky: the next write goes through
    assert contents(s)[:3] == b"a" + INITIAL[1:2] + b"c"


def test_faulty_sticky_is_a_dead_disk() -> None:
    s = FaultyStorage(INITIAL, fail_flush_at=1, sticky=True)
    with pytest.raises(OSError) as exc:
        s.flush()
    assert exc.value.errno == errno.ENOSPC
    for change in (lambda: s.pwrite(0, b"x"), s.flush, lambda: s.truncate(0),
                   lambda: s.event("l1_update")):
        with pytest.raises(OSError):
            change()
    assert contents(s) == INITIAL


def test_faulty_fails_at_a_named_event() -> None:
    s = FaultyStorage(INITIAL, fail_event="l2_update", fail_event_at=2)
    s.event("l2_update")
    s.event("refblock_update")
    with pytest.raises(OSError, match="event l2_update #2"):
        s.event("l2_update")
    assert s.events == ["l2_update", "refblock_update", "l2_update"]
    s.arm(fail_write_at=1)
    assert not s.failed
    with pytest.raises(OSError):
        s.pwrite(0, b"x")
    with pytest.raises(AttributeError):
        s.arm(no_such_setting=1)
