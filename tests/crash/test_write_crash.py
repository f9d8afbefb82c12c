"""Crash ordering of the write path (DESIGN.md section 3).

Each test records the storage operations of a write / discard / write_zeroes workload with
RecordingStorage, then rebuilds every image a power cut could leave (every prefix of the log,
plus sampled subsets of the unflushed writes of each flush epoch) and requires:
- `qemu-img check` reports no corruption and no check error (leaks are allowed);
- every guest sector the workload never touched still reads what was flushed before it;
- in prefix states (writes landed in order) every touched sector reads one of the values it
  held at some point (old data, any written data, or zeros where zeroed / discarded);
- internal snapshots keep their content throughout.
"""

from __future__ import annotations

import errno
import os
import random
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import qcow2kit
from qcow2kit.errors import Qcow2Error
from qcow2kit.image import Image
from qcow2kit.testing import (
    DiskModel,
    FaultyStorage,
    RecordingStorage,
    check_crash_states,
    count_states,
    crash_images,
    is_prefix_label,
)
from qcow2kit.testing.faults import is_dirty, qemu_check_json
from tests.helpers import assert_clean, pattern, qemu_compare, qemu_img, qemu_io, to_raw

SECTOR = 512
# QK_CRASH_MAX=0 checks every state (slow); the default keeps the crash suite fast
_MAX_ENV = int(os.environ.get("QK_CRASH_MAX", "-1"))
MAX_STATES = 120 if _MAX_ENV < 0 else (_MAX_ENV or 10**9)


class History:
    """Every value each guest sector held during a workload (the model's history)."""

    def __init__(self, before: bytes) -> None:
        self.before = np.frombuffer(before, dtype=np.uint8).reshape(-1, SECTOR)
        self.touched = np.zeros(len(self.before), dtype=bool)
        self.values: dict[int, set[bytes]] = {}

    def record(self, model: DiskModel, offset: int, length: int) -> None:
        first, last = offset // SECTOR, -(-(offset + length) // SECTOR)
        for s in range(first, last):
            if not self.touched[s]:
                self.touched[s] = True
                self.values[s] = {self.before[s].tobytes()}
            self.values[s].add(model.read(s * SECTOR, SECTOR))

    def verify(self, image: bytes, strict: bool) -> None:
        got = np.frombuffer(image, dtype=np.uint8).reshape(-1, SECTOR)
        assert got.shape == self.before.shape
        bad = np.flatnonzero(~self.touched & (got != self.before).any(axis=1))
        assert not len(bad), f"untouched guest sector {int(bad[0])} changed"
        if strict:
            for s in np.flatnonzero(self.touched).tolist():
                assert got[s].tobytes() in self.values[s], f"guest sector {s} holds a value never written"


class Workload:
    """Runs operations on an Image and its model at once, recording the history."""

    def __init__(self, img: Image, model: DiskModel, history: History) -> None:
        self.img, self.model, self.history = img, model, history
        self.seed = 1000

    def write(self, offset: int, length: int) -> None:
        self.seed += 1
        data = pattern(self.seed, length)
        self.img.write(offset, data)
        self.model.write(offset, data)
        self.history.record(self.model, offset, length)

    def zero(self, offset: int, length: int, unmap: bool = False) -> None:
        # zeroing only part of a cluster rewrites the rest of it too: record the whole span
        self.img.write_zeroes(offset, length, unmap=unmap)
        self.model.write_zeroes(offset, length)
        self.history.record(self.model, offset, length)

    def discard(self, offset: int, length: int) -> None:
        self.img.discard(offset, length)
        self.model.discard(offset, length)
        self.history.record(self.model, offset, length)

    def flush(self) -> None:
        self.img.flush()


def run_crash_test(
    tmp_path: Path,
    image: Path,
    work: Callable[[Workload], None],
    *,
    reorder_samples: int = 3,
    max_states: int = MAX_STATES,
    snapshots: dict[str, bytes] | None = None,
    expect_events: tuple[str, ...] = (),
    min_states: int = 10,
    backing: bytes | None = None,
) -> RecordingStorage:
    """Record `work` on `image`, check the final image against the model, then every crash
    state."""
    before = to_raw(image, tmp_path / "before.raw")
    storage = RecordingStorage.from_file(image)
    img = Image(storage)
    storage.restart()  # only the workload is recorded
    model = DiskModel(len(before), backing)
    model.data[:] = before
    history = History(before)
    work(Workload(img, model, history))
    img.close()
    # the finished image is clean and equal to the model
    final = tmp_path / "final.qcow2"
    final.write_bytes(storage.contents())
    assert_clean(final)
    (tmp_path / "model.raw").write_bytes(model.raw())
    qemu_compare(final, tmp_path / "model.raw")
    events = {e[1] for e in storage.log if e[0] == "event"}
    for name in expect_events:
        assert name in events, f"workload never hit event {name}: {sorted(events)}"

    def verify_state(path: str, label: str) -> None:
        got = to_raw(path, tmp_path / "state.raw")
        history.verify(got, strict=is_prefix_label(label))
        for name, content in (snapshots or {}).items():
            assert to_raw(path, tmp_path / "snap.raw", snapshot=name) == content, (
                f"snapshot {name} changed"
            )

    total = count_states(storage.log, reorder_samples=reorder_samples, drop_one=True)
    assert total >= min_states, f"only {total} crash states: the workload is too small"
    checked = check_crash_states(
        storage.initial,
        storage.log,
        tmp_path,
        verify_state=verify_state,
        reorder_samples=reorder_samples,
        max_states=max_states,
        drop_one=True,
    )
    assert checked == min(total, max_states)
    return storage


def _prefill(path: Path, size: int, step: int) -> None:
    """Data written (and flushed) by QEMU before the workload: every other `step` bytes."""
    cmds = [f"write -P {0x10 + i % 200} {off} {step // 2}" for i, off in enumerate(range(0, size, step))]
    qemu_io(path, *cmds)


# ---- allocation: L2 tables, refcount blocks, refcount table growth --------------------------
@pytest.mark.slow
def test_allocation_grows_reftable(tmp_path: Path) -> None:
    """512 B clusters with 64-bit refcounts: a refcount block covers 64 clusters and one
    reftable cluster 4096 clusters (2 MiB), so ~2.5 MiB of new data forces refcount blocks,
    L2 tables and a refcount table switch."""
    path = tmp_path / "disk.qcow2"
    size = 8 << 20
    qcow2kit.create(str(path), size, cluster_size=512, refcount_bits=64)
    _prefill(path, 1 << 20, 128 << 10)
    reftable_before = struct.unpack(">Q", path.read_bytes()[48:56])[0]

    def work(w: Workload) -> None:
        w.write(4 << 20, 300)  # partial cluster in a fresh L2 table
        w.flush()
        for i in range(10):  # large sequential writes: many refcount blocks
            w.write((5 << 20) + i * (256 << 10) + 100, 256 << 10)
        w.write(3000, 5000)  # over prefilled data, crossing clusters
        w.discard(64 << 10, 16 << 10)
        w.zero(200 << 10, 40000)
        w.flush()
        w.write(7 << 20, 20 << 10)

    storage = run_crash_test(
        tmp_path, path, work, max_states=max(300, MAX_STATES),
        expect_events=("reftable_grow", "refblock_alloc_hookup", "l2_update", "l1_update"),
    )
    reftable_after = struct.unpack(">Q", storage.contents()[48:56])[0]
    assert reftable_after != reftable_before, "the refcount table never moved"


def test_small_writes_every_prefix(tmp_path: Path) -> None:
    """A short workload checked exhaustively: every prefix and many re-orderings."""
    path = tmp_path / "disk.qcow2"
    qcow2kit.create(str(path), 4 << 20, cluster_size=4096, refcount_bits=16)
    _prefill(path, 2 << 20, 64 << 10)

    def work(w: Workload) -> None:
        w.write(1000, 10000)
        w.write(3 << 20, 4096)
        w.flush()
        w.discard(0, 64 << 10)
        w.zero(128 << 10, 8192, unmap=True)
        w.zero(192 << 10, 12288, unmap=False)
        w.write(129 << 10, 100)

    run_crash_test(tmp_path, path, work, reorder_samples=8, max_states=max(400, MAX_STATES))


# ---- copy on write: internal snapshots -----------------------------------------------------
@pytest.mark.parametrize("extended_l2", [False, True], ids=["std", "xl2"])
def test_cow_with_internal_snapshot(tmp_path: Path, extended_l2: bool) -> None:
    path = tmp_path / "disk.qcow2"
    size = 4 << 20
    cs = 32768 if extended_l2 else 4096
    opts = f"cluster_size={cs}" + (",extended_l2=on" if extended_l2 else "")
    qemu_img("create", "-f", "qcow2", "-o", opts, str(path), str(size))
    _prefill(path, size, 256 << 10)
    qemu_img("snapshot", "-c", "snap1", str(path))
    snap1 = to_raw(path, tmp_path / "snap1.raw", snapshot="snap1")

    def work(w: Workload) -> None:
        w.write(100, 300)  # partial write into a shared cluster and a shared L2 table
        w.write(cs * 3, cs * 2)  # whole shared clusters
        w.flush()
        w.discard(256 << 10, 64 << 10)  # drop shared clusters
        w.zero(512 << 10, cs + 700)  # zero flag over shared clusters, partial tail
        w.write((2 << 20) - 100, 5000)  # crosses an L2-table boundary for 4 KiB clusters
        w.write(3 << 20, 3 * cs)  # fresh area

    run_crash_test(tmp_path, path, work, snapshots={"snap1": snap1})


# ---- compressed clusters being overwritten --------------------------------------------------
def test_overwrite_compressed_clusters(tmp_path: Path) -> None:
    size = 2 << 20
    src = tmp_path / "src.raw"
    rng = random.Random(7)
    # compressible but not trivial: words from a small vocabulary
    words = [bytes(rng.choice(b"abcdefgh") for _ in range(rng.randint(2, 9))) for _ in range(50)]
    text = b" ".join(rng.choice(words) for _ in range(size // 4))[:size]
    src.write_bytes(text.ljust(size, b"\0"))
    path = tmp_path / "disk.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", str(src), str(path))
    info = qemu_check_json(str(path))
    assert info["compressed-clusters"] > 400, info

    def work(w: Workload) -> None:
        w.write(10, 100)  # partial: decompress, rewrite as a normal cluster
        w.write(8192, 4096)  # whole cluster
        w.write(20000, 30000)  # several clusters, partial at both ends
        w.flush()
        w.discard(64 << 10, 8192)
        w.zero(128 << 10, 10000)
        w.zero(192 << 10, 8192, unmap=True)

    run_crash_test(tmp_path, path, work)


# ---- lazy refcounts: dirty bit, repaired on open ------------------------------------------
def test_lazy_refcounts(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    qcow2kit.create(str(path), 4 << 20, cluster_size=4096, lazy_refcounts=True)
    _prefill(path, 1 << 20, 64 << 10)

    def work(w: Workload) -> None:
        w.write(5000, 20000)
        w.flush()
        w.write(2 << 20, 64 << 10)
        w.discard(0, 32 << 10)

    storage = run_crash_test(tmp_path, path, work)
    # qcow2kit's own repair: opening a dirty crash state read-write rebuilds the refcounts,
    # after which QEMU finds it clean, leaks included, and the flushed data intact
    state = tmp_path / "ours.qcow2"
    before = to_raw(path, tmp_path / "before.raw")
    dirty = 0
    for label, image in crash_images(storage.initial, storage.log, reorder_samples=2,
                                     max_states=min(MAX_STATES, 60)):
        if not is_dirty(image):
            continue
        dirty += 1
        state.write_bytes(image)
        qcow2kit.open(str(state), "r+").close()
        assert not is_dirty(state.read_bytes()), label
        assert_clean(state)
        got = to_raw(state, tmp_path / "state.raw")
        assert got[64 << 10 : 2 << 20] == before[64 << 10 : 2 << 20], label
    assert dirty > 5


# ---- compat 0.10 and a backing file ----------------------------------------------------------
def test_v2_with_backing(tmp_path: Path) -> None:
    size = 4 << 20
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(3, size))
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", "-b", "base.raw",
             "-F", "raw", str(path))
    qemu_io(path, "write -P 0x33 0 64k")

    def work(w: Workload) -> None:
        w.write(100, 5000)  # partial: copies backing data around it
        w.zero(64 << 10, 10000)  # v2 with backing: zero bytes are written
        w.flush()
        w.discard(0, 8192)  # backing data shows through again
        w.write(1 << 20, 4096 * 5 + 1)

    run_crash_test(tmp_path, path, work, backing=base.read_bytes())


# ---- I/O errors: the image stays consistent ---------------------------------------------------
def _error_workload(img: Image) -> None:
    img.write(1000, b"\x01" * 9000)
    img.write(3 << 20, b"\x02" * 70000)
    img.flush()
    img.discard(0, 8192)
    img.write_zeroes(1 << 20, 16384)
    img.write(5000, b"\x03" * 100)


@pytest.mark.parametrize("sticky", [False, True], ids=["transient", "dead-disk"])
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_write_errors_leave_consistent_image(tmp_path: Path, error: int, sticky: bool) -> None:
    """ENOSPC/EIO at every single write: the error propagates as OSError with its errno,
    and whatever reached the storage passes qemu-img check (leaks allowed)."""
    path = tmp_path / "disk.qcow2"
    qcow2kit.create(str(path), 8 << 20, cluster_size=512, refcount_bits=16)
    initial = path.read_bytes()
    probe = FaultyStorage(initial)
    img = Image(probe)
    _error_workload(img)
    img.close()
    total = probe.writes
    assert total > 10
    step = max(1, total // 40)
    state = tmp_path / "state.qcow2"
    for n in range(1, total + 1, step):
        storage = FaultyStorage(initial, fail_write_at=n, error=error, sticky=sticky)
        img = Image(storage)
        with pytest.raises(OSError) as info:
            _error_workload(img)
            img.close()
        assert info.value.errno == error
        assert storage.failed
        try:
            img.close()  # transient: a retry may succeed; a dead disk fails again
        except (OSError, Qcow2Error):
            pass
        state.write_bytes(bytes(storage.buf))
        out = qemu_check_json(str(state))
        assert out.get("corruptions", 0) == 0 and out.get("check-errors", 1) == 0, (n, out)


def test_error_at_named_event(tmp_path: Path) -> None:
    """A failure just before an L2 write (event l2_update) leaves the image consistent."""
    path = tmp_path / "disk.qcow2"
    qcow2kit.create(str(path), 8 << 20, cluster_size=4096)
    initial = path.read_bytes()
    storage = FaultyStorage(initial, fail_event="l2_update", error=errno.EIO)
    img = Image(storage)
    with pytest.raises(OSError) as info:
        _error_workload(img)
    assert info.value.errno == errno.EIO
    assert "l2_update" in storage.events
    img.close()  # transient: the retried flush writes the table
    state = tmp_path / "state.qcow2"
    state.write_bytes(bytes(storage.buf))
    out = qemu_check_json(str(state))
    assert out.get("corruptions", 0) == 0 and out.get("check-errors", 1) == 0, out


EVENTS = (
    "l2_update", "l1_update", "refblock_update", "refblock_alloc_write",
    "refblock_alloc_hookup", "reftable_grow", "header_update",
)


def _growth_ops() -> list[tuple[str, int, int]]:
    ops = [("write", 1000, 3000), ("flush", 0, 0)]
    ops += [("write", (1 << 20) + i * (128 << 10) + 7, 128 << 10) for i in range(20)]
    ops += [("discard", 0, 4096), ("zero", 200 << 10, 3000), ("write", 600, 100)]
    return ops


def _apply_op(img: Image | DiskModel, op: tuple[str, int, int]) -> None:
    kind, off, n = op
    if kind == "write":
        img.write(off, pattern(off ^ n, n))
    elif kind == "discard":
        img.discard(off, n)
    elif kind == "zero":
        img.write_zeroes(off, n)
    elif isinstance(img, Image):
        img.flush()


@pytest.mark.parametrize("event", EVENTS)
def test_transient_error_at_event_then_retry(tmp_path: Path, event: str) -> None:
    """EIO just before a metadata write of each kind (512 B clusters, 64-bit refcounts, so
    refcount blocks and the refcount table grow): the operation fails with EIO; retrying it
    succeeds, the data reads back as if nothing failed, and QEMU finds no corruption."""
    path = tmp_path / "disk.qcow2"
    size = 8 << 20
    qcow2kit.create(str(path), size, cluster_size=512, refcount_bits=64)
    initial = path.read_bytes()
    ops = _growth_ops()
    probe = FaultyStorage(initial)
    img = Image(probe)
    for op in ops:
        _apply_op(img, op)
    img.close()
    hits = probe.events.count(event)
    assert hits, f"workload never reaches {event}"
    for at in sorted({1, (hits + 1) // 2, hits}):
        storage = FaultyStorage(initial, fail_event=event, fail_event_at=at, error=errno.EIO)
        img = Image(storage)
        model = DiskModel(size)
        failures = 0
        for op in ops:
            try:
                _apply_op(img, op)
            except OSError as exc:
                assert exc.errno == errno.EIO
                failures += 1
                _apply_op(img, op)  # the retry
            _apply_op(model, op)
        try:
            img.flush()
        except OSError:
            failures += 1
            img.flush()
        img.close()  # a failed close() would lose what it could not write: flush first
        assert failures == 1 and storage.failed, (event, at, failures)
        state = tmp_path / "state.qcow2"
        state.write_bytes(bytes(storage.buf))
        out = qemu_check_json(str(state))
        assert out.get("corruptions", 0) == 0 and out.get("check-errors", 1) == 0, (event, at, out)
        raw = tmp_path / "model.raw"
        raw.write_bytes(model.raw())
        qemu_compare(state, raw)


# ---- random workloads on random images ----------------------------------------------------
_RANDOM_SETUPS = [
    ("cluster_size=512,refcount_bits=64", None),
    ("cluster_size=4096,refcount_bits=1", None),
    ("cluster_size=4096", "snapshot"),
    ("cluster_size=65536,extended_l2=on", "snapshot"),
    ("cluster_size=16384,extended_l2=on,refcount_bits=64", "compressed"),
    ("cluster_size=4096,compat=0.10", "compressed"),
    ("cluster_size=4096,lazy_refcounts=on", "snapshot"),
    ("cluster_size=32768,extended_l2=on", "backing"),
    ("cluster_size=4096,compat=0.10", "backing"),
    ("cluster_size=512,refcount_bits=64", "snapshot"),
]


_SEEDS = int(os.environ.get("QK_CRASH_SEEDS", "1"))  # more seeds for a long hunt


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(_SEEDS))
@pytest.mark.parametrize("setup", range(len(_RANDOM_SETUPS)), ids=[o for o, _ in _RANDOM_SETUPS])
def test_random_workload_crash(tmp_path: Path, setup: int, seed: int) -> None:
    """Seeded random write / zero / discard / flush workloads on images QEMU made (with an
    internal snapshot, or compressed clusters): every state checked is consistent."""
    opts, start = _RANDOM_SETUPS[setup]
    size = 2 << 20
    path = tmp_path / "disk.qcow2"
    snapshots: dict[str, bytes] = {}
    base_data: bytes | None = None
    if start == "compressed":
        src = tmp_path / "src.raw"
        src.write_bytes((b"qcow2kit random crash " * (size // 22 + 1))[:size])
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, str(src), str(path))
    else:
        if start == "backing":
            base = tmp_path / "base.raw"
            base_data = pattern(setup, size - 4096)  # shorter than the overlay
            base.write_bytes(base_data)
            opts += ",backing_file=base.raw,backing_fmt=raw"
        qemu_img("create", "-f", "qcow2", "-o", opts, str(path), str(size))
        _prefill(path, size, 128 << 10)
        if start == "snapshot":
            qemu_img("snapshot", "-c", "s", str(path))
            snapshots["s"] = to_raw(path, tmp_path / "s.raw", snapshot="s")
    rng = random.Random(setup + 1000 * seed)
    cs = int(opts.split(",")[0].split("=")[1])

    def work(w: Workload) -> None:
        for _ in range(12):
            off = rng.randrange(0, size // cs) * cs + rng.choice([0, 0, 1, 512, cs // 2, cs - 1])
            off = min(off, size - 1)
            n = min(size - off, rng.choice([1, 512, cs - 1, cs, cs + 1, 3 * cs, 100_000]))
            what = rng.random()
            if what < 0.55:
                w.write(off, n)
            elif what < 0.7:
                w.zero(off, n, unmap=rng.random() < 0.5)
            elif what < 0.85:
                w.discard(off, n)
            else:
                w.flush()

    run_crash_test(tmp_path, path, work, snapshots=snapshots, max_states=min(MAX_STATES, 60),
                   min_states=3, backing=base_data)


# ---- the harness itself ------------------------------------------------------------------------
def test_harness_crash_images() -> None:
    st = RecordingStorage(b"\0" * 8)
    st.event("header_update")
    st.pwrite(0, b"A")
    st.pwrite(1, b"B")
    st.flush()
    st.event("l2_update")
    st.pwrite(2, b"C")
    st.event("l1_update")
    st.pwrite(3, b"D")
    st.pwrite(4, b"E" * 1024)
    st.truncate(6)
    states = dict(crash_images(st.initial, st.log))
    images = list(states.values())
    # every prefix: initial, A, AB, ABC, ABCD, ABCDE..., truncated
    assert images[0] == b"\0" * 8
    assert images[1] == b"A" + b"\0" * 7
    assert images[2] == b"AB" + b"\0" * 6
    assert images[3] == b"ABC" + b"\0" * 5
    assert images[-1] == b"ABCDEE"
    assert len(images) == 7
    assert count_states(st.log) == 7
    assert any("(l1_update)" in label for label in states)
    # drop-one: the l2_update write (C) lost while D and the rest landed
    drops = {k: v for k, v in crash_images(st.initial, st.log, drop_one=True) if "lost op" in k}
    assert list(drops.values()) == [b"AB\0DEE"]
    # reorder samples never lose writes from before the last flush
    for label, image in crash_images(st.initial, st.log, reorder_samples=20, seed=3):
        if "sample" in label and label.startswith("epoch 1 "):
            assert image[:2] == b"AB", label
    # max_states keeps the first and the full prefix
    few = list(crash_images(st.initial, st.log, reorder_samples=20, drop_one=True, max_states=4))
    assert len(few) == 4
    labels = [k for k, _ in few]
    assert "prefix 0/" in labels[0] or any(k.startswith("prefix 0/") for k in labels)
    assert any(k.startswith(f"prefix {len(st.ops)}/") for k in labels)


def test_harness_faulty_storage() -> None:
    fs = FaultyStorage(b"\0" * 16, fail_write_at=2, error=errno.ENOSPC)
    fs.pwrite(0, b"a")
    with pytest.raises(OSError) as info:
        fs.pwrite(1, b"b")
    assert info.value.errno == errno.ENOSPC and fs.failed
    fs.pwrite(2, b"c")  # transient: the next write works
    assert bytes(fs.buf[:3]) == b"a\0c"
    dead = FaultyStorage(b"", fail_event="l1_update", sticky=True, error=errno.EIO)
    dead.event("l2_update")
    with pytest.raises(OSError):
        dead.event("l1_update")
    with pytest.raises(OSError):
        dead.pwrite(0, b"x")  # a dead disk stays dead
    with pytest.raises(OSError):
        dead.flush()
    dead.arm(sticky=False, fail_event=None)
    dead.pwrite(0, b"x")
    assert dead.events == ["l2_update", "l1_update"]


def test_harness_detects_misordering(tmp_path: Path) -> None:
    """The checker must fail on a log that points L1 at an L2 table before the table's
    refcount exists: a hand-made bad ordering."""
    path = tmp_path / "disk.qcow2"
    qcow2kit.create(str(path), 4 << 20, cluster_size=4096)
    good = RecordingStorage.from_file(path)
    img = Image(good)
    good.restart()
    img.write(0, b"x" * 4096)
    img.close()
    # move every refcount-block write of the log to the end: references before refcounts
    ops = [e for e in good.log if e[0] != "flush"]
    ref_writes = [e for e in ops if e[0] == "write" and e[1] == 2 * 4096]
    assert ref_writes, "expected a refcount block write at cluster 2"
    bad_log = [e for e in ops if e not in ref_writes] + ref_writes
    with pytest.raises(AssertionError, match="corruption|check error"):
        check_crash_states(good.initial, bad_log, tmp_path, reorder_samples=0)


@pytest.mark.parametrize("xl2", [False, True], ids=["std", "xl2"])
def test_data_file_metadata_crash(tmp_path: Path, xl2: bool) -> None:
    """External data file: the qcow2 file holds only metadata. Its crash states (with the data
    file as it ended up) are consistent and the data written before reads back."""
    from qcow2kit.io.memory import MemoryStorage

    path = tmp_path / "disk.qcow2"
    data_path = tmp_path / "disk.data"
    size = 4 << 20
    cs = 32768 if xl2 else 4096
    qcow2kit.create(str(path), size, cluster_size=cs, extended_l2=xl2, data_file=str(data_path))
    qemu_io(path, "write -P 0x21 0 1M")
    before = to_raw(path, tmp_path / "before.raw")
    meta = RecordingStorage.from_file(path)
    data = MemoryStorage(data_path.read_bytes(), name=str(data_path))
    img = Image(meta, data_storage=data)
    meta.restart()
    img.write(100, pattern(1, 5000))
    img.write(2 << 20, pattern(2, 3 * cs + 1))
    img.flush()
    img.discard(64 << 10, 2 * cs)
    img.write_zeroes(512 << 10, cs + 100, unmap=True)
    img.write(3 << 20, pattern(3, cs))
    img.close()
    data_path.write_bytes(bytes(data.buf))
    final = tmp_path / "final.qcow2"
    final.write_bytes(meta.contents())
    assert_clean(final)
    untouched = [(1 << 20, 2 << 20)]

    def verify(p: str) -> None:
        got = to_raw(Path(p), tmp_path / "state.raw")
        for lo, hi in untouched:
            assert got[lo:hi] == before[lo:hi]
        assert got[8192:64 << 10] == before[8192:64 << 10]

    n = check_crash_states(meta.initial, meta.log, tmp_path, verify=verify, reorder_samples=3,
                           max_states=MAX_STATES, drop_one=True)
    assert n >= 3
