"""ops/shrink_discard: the early discard of `resize --shrink` punches exactly the host clusters
that qemu-img map shows behind the cropped guest range, and nothing at all unless the image is
proven clean (a wrong punch would destroy data the shrink keeps)."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from qcow2kit.io.file import FileStorage
from qcow2kit.io.memory import MemoryStorage
from qcow2kit.ops import shrink_discard
from qcow2kit.ops.shrink_discard import EarlyDiscard, cropped_runs
from tests.helpers import assert_clean, qemu_check, qemu_img, qemu_io, qemu_map

K = 1024
M = 1 << 20


def _expected_runs(path: Path, new_size: int, cs: int) -> list[tuple[int, int]]:
    """From qemu-img map: the host ranges behind guest clusters wholly past new_size."""
    cut = -(-new_size // cs) * cs
    pieces = []
    for e in qemu_map(path):
        if "offset" not in e or e["depth"] != 0:
            continue
        start, end = max(e["start"], cut), e["start"] + e["length"]
        if start < end:
            pieces.append((e["offset"] + start - e["start"], end - start))
    merged: list[tuple[int, int]] = []
    for off, length in sorted(pieces):
        if merged and sum(merged[-1]) == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + length)
        else:
            merged.append((off, length))
    return merged


def _runs(path: Path, new_size: int) -> list[tuple[int, int]]:
    storage = FileStorage(str(path))
    try:
        return cropped_runs(storage, new_size)
    finally:
        storage.close()


@pytest.fixture
def scattered(tmp_path: Path) -> Path:
    """4 KiB clusters (an L2 table maps 2 MiB), written backwards in uneven pieces so that the
    host layout is not the guest's, with holes and allocated zero clusters."""
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "12M")
    cmds = [f"write -P {i % 250 + 1} {off} {length}"
            for i, (off, length) in enumerate(
                [(11 * M, M), (9 * M + 12 * K, 300 * K), (6 * M, 2 * M + 4 * K), (3 * M, 64 * K),
                 (0, 2 * M), (5 * M - 8 * K, 40 * K)])]
    qemu_io(img, *cmds, "write -z 7M 16K", "write -z 11M 8K")
    assert_clean(img)
    return img


@pytest.mark.parametrize("new_size", [512, 3 * M, 5 * M - 4 * K, 6 * M + 512, 7 * M + 8 * K, 12 * M - 4 * K])
def test_runs_match_qemu_map(scattered: Path, new_size: int) -> None:
    runs = _runs(scattered, new_size)
    assert runs == _expected_runs(scattered, new_size, 4096)
    assert runs  # every size here crops some data


def test_runs_of_a_dense_64k_image(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "40M")
    qemu_io(img, "write -P 7 20M 20M", "write -P 8 0 20M")  # the tail lies first in the file
    runs = _runs(img, 10 * M)
    assert runs == _expected_runs(img, 10 * M, 65536)
    assert sum(length for _, length in runs) == 30 * M


def test_overlay_runs_are_its_own_clusters(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "8M")
    qemu_io(base, "write -P 1 0 8M")
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    qemu_io(top, "write -P 2 5M 1M")
    assert _runs(top, 2 * M) == _expected_runs(top, 2 * M, 65536)
    assert sum(length for _, length in _runs(top, 2 * M)) == M


@pytest.mark.parametrize("new_size", [12 * M, 16 * M, 0, 3 * M + 100])
def test_no_runs_unless_a_shrink(scattered: Path, new_size: int) -> None:
    assert _runs(scattered, new_size) == []


def test_declines_snapshots_compressed_and_v2(tmp_path: Path) -> None:
    snap = tmp_path / "snap.qcow2"
    qemu_img("create", "-f", "qcow2", str(snap), "8M")
    qemu_io(snap, "write -P 1 0 8M")
    assert _runs(snap, M)  # proven clean: would punch
    qemu_img("snapshot", "-c", "s", str(snap))
    assert _runs(snap, M) == []

    comp = tmp_path / "comp.qcow2"
    qemu_img("create", "-f", "qcow2", str(comp), "8M")
    qemu_io(comp, "write -c -P 2 6M 64K", "write -P 1 0 6M", "write -P 1 7M 1M")
    assert _runs(comp, M) == []

    v2 = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", str(v2), "8M")
    qemu_io(v2, "write -P 1 0 8M")
    assert _runs(v2, M) == []


def _l2_entry_offset(path: Path, guest: int) -> int:
    """File offset of the L2 entry mapping `guest` (64 KiB clusters)."""
    data = path.read_bytes()
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1_offset + (guest >> 29) * 8)[0] & 0x00FFFFFFFFFFFE00
    return l2 + ((guest >> 16) & 8191) * 8


def test_declines_a_cluster_also_mapped_below_the_new_end(tmp_path: Path) -> None:
    """A corrupt image maps one host cluster both below and past the new end (refcount 1):
    punching it would destroy data the shrink keeps, so nothing is punched."""
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "8M")
    qemu_io(img, "write -P 1 0 8M")
    kept, cropped = _l2_entry_offset(img, 0), _l2_entry_offset(img, 6 * M)
    with open(img, "r+b") as f:
        f.seek(kept)
        entry = f.read(8)
        f.seek(cropped)
        f.write(entry)
    assert qemu_check(img)["corruptions"] > 0
    assert _runs(img, M) == []


def test_declines_a_leak(tmp_path: Path) -> None:
    img = tmp_path / "l.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "8M")
    qemu_io(img, "write -P 1 0 8M")
    with open(img, "ab") as f:  # one more cluster, counted by nobody's reference
        f.write(bytes(65536))
    data = img.read_bytes()
    rt = struct.unpack_from(">Q", data, 48)[0]
    block = struct.unpack_from(">Q", data, rt)[0]
    last = len(data) // 65536 - 1
    with open(img, "r+b") as f:
        f.seek(block + last * 2)
        f.write(b"\0\1")
    assert qemu_check(img)["leaks"] == 1
    assert _runs(img, M) == []


# ---- the threads ------------------------------------------------------------------------------
def test_discard_punches_the_runs_and_drops_their_cache(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "200M")
    qemu_io(img, "write -P 9 0 200M")
    runs = _runs(img, 8 * M)
    storage = FileStorage(str(img), True)
    try:
        before = storage.allocated_bytes()
        discard = EarlyDiscard(storage, runs, storage.fd).start()
        assert len(discard.chunks) > 2  # more than one piece of CHUNK_BYTES: the pipeline runs
        discard.wait()
        assert discard.error is None
        freed = before - storage.allocated_bytes()
        assert sum(length for _, length in runs) == 192 * M
        assert 192 * M - 64 * 1024 <= freed <= 192 * M  # the file system's own blocks may vary
        for off, length in runs:
            assert storage.pread(off, 4096) == bytes(4096)
            assert storage.pread(off + length - 4096, 4096) == bytes(4096)
    finally:
        storage.close()
    # nothing but the cropped data went: consistent, and the kept range reads as before
    assert_clean(img)
    qemu_io(img, "read -P 9 0 8M", "read -P 0 8M 192M")


class _FailingPunch(MemoryStorage):
    def __init__(self, initial: bytes) -> None:
        super().__init__(initial, "<failing>", True)
        self.punched: list[tuple[int, int]] = []

    def punch_hole(self, offset: int, length: int) -> None:
        if self.punched:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.punched.append((offset, length))
        super().punch_hole(offset, length)


def test_an_error_stops_the_discard_quietly() -> None:
    storage = _FailingPunch(bytes(4 * M))
    runs = [(0, shrink_discard.CHUNK_BYTES + M), (2 * shrink_discard.CHUNK_BYTES, M)]
    discard = EarlyDiscard(storage, runs).start()
    discard.wait()
    assert storage.punched == [(0, shrink_discard.CHUNK_BYTES)]
    assert isinstance(discard.error, OSError) and discard.error.errno == errno.EIO
    discard.wait()  # again: nothing left to do


def test_start_declines_a_read_only_storage(scattered: Path) -> None:
    storage = FileStorage(str(scattered))
    try:
        assert shrink_discard.start(storage, M) is None
    finally:
        storage.close()


def test_start_declines_little_cropped_data(scattered: Path) -> None:
    # about 4 MiB past 8 MiB: below MIN_BYTES, the shrink's truncate is as quick
    assert sum(length for _, length in _runs(scattered, 8 * M)) < shrink_discard.MIN_BYTES
    storage = FileStorage(str(scattered), True)
    try:
        assert shrink_discard.start(storage, 8 * M) is None
    finally:
        storage.close()


def test_a_small_crop_of_a_large_image_is_not_worth_the_proof(
        scattered: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The proof reads every L2 table; with PROOF_ENTRIES at 0, 6 tables of 512 entries
    need more than 3072 / 64 = 48 cropped clusters."""
    monkeypatch.setattr(shrink_discard, "PROOF_ENTRIES", 0)
    assert _runs(scattered, 12 * M - 64 * K) == []
    assert _runs(scattered, 3 * M) == _expected_runs(scattered, 3 * M, 4096)


def test_min_bytes(scattered: Path) -> None:
    cropped = sum(length for _, length in _runs(scattered, 8 * M))
    storage = FileStorage(str(scattered))
    try:
        assert cropped_runs(storage, 8 * M, cropped) == _runs(scattered, 8 * M)
        assert cropped_runs(storage, 8 * M, cropped + 1) == []
    finally:
        storage.close()
