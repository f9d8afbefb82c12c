"""Snapshot commands on damaged images: a clear error, never a traceback, and the file is
left exactly as it was."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import qemu_img, qemu_io


def ours(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "qcow2kit", *args], capture_output=True)


def snapshot_table(p: Path) -> int:
    return int(struct.unpack_from(">Q", p.read_bytes(), 64)[0])


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "h.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(p), "2M")
    qemu_io(p, "write -P 1 0 512k")
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -P 2 0 64k")
    return p


def patch(p: Path, offset: int, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("what", ["l1-outside", "l1-unaligned", "l2-outside", "names-past-end",
                                  "refcount-zero"])
def test_damaged_snapshot_refused_cleanly(image: Path, what: str) -> None:
    table = snapshot_table(image)
    entry = image.read_bytes()[table : table + 40]
    l1_off = struct.unpack_from(">Q", entry, 0)[0]
    if what == "l1-outside":
        patch(image, table, struct.pack(">Q", 1 << 40))
    elif what == "l1-unaligned":
        patch(image, table, struct.pack(">Q", l1_off + 8))
    elif what == "l2-outside":
        patch(image, l1_off, struct.pack(">Q", (1 << 40) | (1 << 63)))
    elif what == "names-past-end":
        patch(image, table + 12, struct.pack(">HH", 60000, 60000))
    else:  # the snapshot's L2 table counted 0 times: applying it must not hide that
        l2 = struct.unpack_from(">Q", image.read_bytes(), l1_off)[0] & ((1 << 56) - 512)
        # one refcount block (16-bit counts) at the cluster the reftable names
        reftable = struct.unpack_from(">Q", image.read_bytes(), 48)[0]
        block = struct.unpack_from(">Q", image.read_bytes(), reftable)[0]
        patch(image, block + (l2 // 4096) * 2, b"\0\0")
    before = image.read_bytes()
    for action in ("-a", "-d", "-l", "-c"):
        image.write_bytes(before)
        res = ours("snapshot", action, "s1", str(image))
        err = res.stderr.decode()
        assert "Traceback" not in err and "internal error" not in err, err
        if action == "-c":
            continue  # QEMU too snapshots the active disk whatever the other snapshots hold
        assert image.read_bytes() == before, (action, err)
        if action != "-l" or what == "names-past-end":
            assert res.returncode == 1, (action, err)
