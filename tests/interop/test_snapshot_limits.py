"""Snapshot table limits: 65,536 snapshots at most (QEMU: -EFBIG), names cut at 255 bytes,
the Python calls' errors, and a snapshot of an image with a backing file."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.format.snapshot import Snapshot
from qcow2kit.image import Image
from qcow2kit.metadata import snapshots as meta_snapshots
from qcow2kit.metadata.refchanges import RefChanges
from qcow2kit.metadata.snapshot_commit import TableReader, commit
from qcow2kit.ops.snapshot import apply_snapshot, create_snapshot, delete_snapshot
from tests.helpers import assert_clean, qemu_img, qemu_io, to_raw

EXTRA = struct.pack(">QQQ", 0, 0, 0)


def ours(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "qcow2kit", *args], capture_output=True)


def test_65536_snapshots_and_no_more(tmp_path: Path) -> None:
    p = tmp_path / "many.qcow2"
    qcow2kit.create(str(p), 1 << 20, cluster_size=65536)
    with Image.open_path(str(p), writable=True) as img:
        # snapshots without L1 tables, written as one table change
        meta = img.meta
        fake = [Snapshot(0, 0, str(i + 1), "s", 0, 0, 0, 0, EXTRA) for i in range(65535)]
        commit(meta, RefChanges(meta), TableReader(meta), size=1 << 20,
               active_l1=meta.l2.l1.copy(), snapshots=fake, old_l1_kept=False)
    assert ours("snapshot", "-c", "last", str(p)).returncode == 0
    res = ours("snapshot", "-c", "one-too-many", str(p))
    assert res.returncode == 1
    assert res.stderr == b"qcow2kit: Could not create snapshot 'one-too-many': -27 (File too large)\n"
    assert_clean(p)
    assert ours("snapshot", "-d", "last", str(p)).returncode == 0
    assert_clean(p)
    assert ours("snapshot", "-c", "again", str(p)).returncode == 0
    theirs = qemu_img("snapshot", "-c", "x", str(p), check=False)  # leaks a cluster itself
    assert "-27 (File too large)" in theirs.stderr


def test_python_calls(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(base), "2M")
    qemu_io(base, "write -P 1 0 2M")
    p = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o",
             "cluster_size=4096", str(p))
    with qcow2kit.open(str(p), "r+") as img:
        img.write(4096, b"\x22" * 8192)
        sn = create_snapshot(img, "n" * 300)
        assert (sn.id_str, len(sn.name), sn.disk_size, sn.icount) == ("1", 255, 2 << 20, 0)
        before = img.read(0, 2 << 20)
        img.write(0, b"\x33" * 4096)  # unflushed: the snapshot calls flush first
        create_snapshot(img, "after")
        apply_snapshot(img, "1")
        assert img.read(0, 2 << 20) == before
        with pytest.raises(meta_snapshots.SnapshotNotFoundError):
            delete_snapshot(img, "nope")
        with pytest.raises(meta_snapshots.SnapshotNotFoundError):
            apply_snapshot(img, "nope")
        delete_snapshot(img, "after")
        img.write(1 << 20, b"\x44" * 4096)
    assert_clean(p)
    data = to_raw(p, tmp_path / "x.raw")
    assert data[:4096] == b"\x01" * 4096 and data[4096:12288] == b"\x22" * 8192
    assert data[1 << 20 : (1 << 20) + 4096] == b"\x44" * 4096
    with qcow2kit.open(str(p)) as img, pytest.raises(qcow2kit.ImageStateError):
        create_snapshot(img, "read-only")


@pytest.mark.parametrize("old_extra", [b"", struct.pack(">Q", 5), struct.pack(">QQ", 5, 7)])
def test_short_extra_data_completed_like_qemu(tmp_path: Path, old_extra: bytes) -> None:
    """An old entry with less than 24 bytes of extra data is rewritten as QEMU does: the
    current size for a missing disk size, -1 for a missing icount."""
    p = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", str(p), "1M")
    with Image.open_path(str(p), writable=True) as img:
        meta = img.meta
        old = Snapshot(0, 0, "1", "old", 7, 0, 0, 0, old_extra)
        commit(meta, RefChanges(meta), TableReader(meta), size=1 << 20,
               active_l1=meta.l2.l1.copy(), snapshots=[old], old_l1_kept=False)
    q = tmp_path / "q.qcow2"
    q.write_bytes(p.read_bytes())
    assert ours("snapshot", "-c", "new", str(p)).returncode == 0
    qemu_img("snapshot", "-c", "new", str(q))
    tables = []
    for path in (p, q):
        with Image.open_path(str(path)) as img:
            tables.append([(s.extra_data, s.disk_size, s.icount) for s in img.snapshots])
    assert tables[0] == tables[1]
    size = 7 if len(old_extra) >= 16 else 1 << 20
    assert tables[0][0][1:] == (size, (1 << 64) - 1)
    assert_clean(p)


def test_list_fields_qemu_img_cannot_make(tmp_path: Path) -> None:
    """VM state sizes, clocks past 100 hours, a missing or negative icount, old dates:
    `snapshot -l`, `info` and `info --output=json` as qemu-img prints them."""
    p = tmp_path / "f.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1M")
    rows = [
        (0, 0, 0, b""),
        (1536 * 1024, 3_723_004_000_000, 4_000_000_000, struct.pack(">QQQ", 1536 * 1024, 1 << 20, 7)),
        (999, 360_000_999_000_000, 0, struct.pack(">QQQ", 5 << 30, 1 << 20, (1 << 64) - 1)),
        (1, 10**9, 86400, struct.pack(">QQQ", 1, 1 << 20, (1 << 64) - 5)),
    ]
    with Image.open_path(str(p), writable=True) as img:
        meta = img.meta
        fake = [Snapshot(0, 0, str(i + 1), f"n{i}", date, 123, clock, vm, extra)
                for i, (vm, clock, date, extra) in enumerate(rows)]
        commit(meta, RefChanges(meta), TableReader(meta), size=1 << 20,
               active_l1=meta.l2.l1.copy(), snapshots=fake, old_l1_kept=False)
    for args in (["snapshot", "-l"], ["info"], ["info", "--output=json"]):
        a = ours(*args, str(p))
        b = subprocess.run(["qemu-img", *args, str(p)], capture_output=True)
        assert a.stdout == b.stdout, args


def test_compressed_writes_around_snapshot_calls(tmp_path: Path) -> None:
    """The compressed-cluster packer's partly filled cluster may be shared by a new snapshot
    or freed by apply/delete: the next compressed write must start a new cluster."""
    p = tmp_path / "wc.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096,refcount_bits=2", str(p), "1M")
    with qcow2kit.open(str(p), "r+") as img:
        img.write_compressed(0, b"a" * 4096)
        create_snapshot(img, "s")
        img.write_compressed(4096, b"b" * 4096)
        img.write_compressed(8192, b"c" * 4096)
        apply_snapshot(img, "s")
        img.write_compressed(12288, b"d" * 4096)
        delete_snapshot(img, "s")
        img.write_compressed(16384, b"e" * 4096)
    assert_clean(p)
    data = to_raw(p, tmp_path / "x.raw")
    assert data[:20480] == b"a" * 4096 + bytes(8192) + b"d" * 4096 + b"e" * 4096


def test_table_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A table that would pass QEMU's 64 MiB limit is refused with -27 before any write
    (the limit lowered here so that the test stays small)."""
    from qcow2kit.format import constants
    from qcow2kit.ops.snapshot import SnapshotCommandError, create_command

    p = tmp_path / "t.qcow2"
    qemu_img("create", "-f", "qcow2", str(p), "1M")
    qemu_img("snapshot", "-c", "a" * 200, str(p))
    before = p.read_bytes()
    monkeypatch.setattr(constants, "MAX_SNAPSHOT_TABLE_BYTES", 400)
    with pytest.raises(SnapshotCommandError, match=r"^Could not create snapshot 'b+': -27 "
                       r"\(File too large\)$"):
        create_command(str(p), "b" * 200)
    assert p.read_bytes() == before
