"""Crash safety of the write path (DESIGN.md section 3): I/O errors. ENOSPC / EIO at every
single write (transient, or a dead disk), at a named metadata event, and at each kind of
metadata write with a retry afterwards: the error propagates as OSError with its errno, and
the image left behind passes qemu-img check (leaks allowed); after a successful retry the
data reads back as if nothing failed. Power cuts: test_write_crash.py.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.errors import Qcow2Error
from qcow2kit.image import Image
from qcow2kit.testing import (
    DiskModel,
    FaultyStorage,
)
from qcow2kit.testing.faults import qemu_check_json
from tests.helpers import pattern, qemu_compare


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
