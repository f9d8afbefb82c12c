"""Shared parts of the write-path crash tests (test_write_crash.py): the crash-test driver.

run_crash_test records the storage operations of a Workload (write / zero / discard / flush
run on an Image and on a DiskModel at once) with RecordingStorage, checks the finished image
against the model, then rebuilds every image a power cut could leave (every prefix of the
log, sampled subsets of the unflushed writes of each flush epoch, each write lost alone) and
checks each with qemu-img and the History of every guest sector. MAX_STATES bounds the
states checked (QK_CRASH_MAX=0: all of them); prefill writes QEMU-made data before a
workload.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qcow2kit.image import Image
from qcow2kit.testing import (
    DiskModel,
    RecordingStorage,
    check_crash_states,
    count_states,
    is_prefix_label,
)
from tests.helpers import assert_clean, pattern, qemu_compare, qemu_io, to_raw

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


def prefill(path: Path, size: int, step: int) -> None:
    """Data written (and flushed) by QEMU before the workload: every other `step` bytes."""
    cmds = [f"write -P {0x10 + i % 200} {off} {step // 2}" for i, off in enumerate(range(0, size, step))]
    qemu_io(path, *cmds)
