"""Tests of the crash harness itself (qcow2kit.testing): RecordingStorage's crash images
(every prefix, each write lost alone, sampled reorderings within a flush epoch, max_states),
FaultyStorage's injected errors (transient or sticky, at a write or at a named event), and
check_crash_states failing on a hand-made bad write ordering. The write-path crash tests
that rely on them: test_write_crash.py and test_write_io_errors.py.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.image import Image
from qcow2kit.testing import (
    FaultyStorage,
    RecordingStorage,
    check_crash_states,
    count_states,
    crash_images,
)


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
