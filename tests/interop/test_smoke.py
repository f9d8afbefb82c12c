"""End-to-end smoke: create, write, qemu-img check clean and compare equal to a raw mirror."""

from __future__ import annotations

from pathlib import Path

import qcow2kit
from tests.helpers import assert_clean, qemu_compare


def test_create_write_read_back(tmp_path: Path) -> None:
    img_path = tmp_path / "a.qcow2"
    raw_path = tmp_path / "a.raw"
    size = 64 << 20
    qcow2kit.create(str(img_path), size)
    mirror = bytearray(size)
    writes = [(0, b"\xaa" * 100_000), (5000, b"hello"), (size - 70_000, b"\xbb" * 70_000),
              (33 << 20, bytes(range(256)) * 1000)]
    with qcow2kit.open(str(img_path), "r+") as img:
        for off, data in writes:
            img.write(off, data)
            mirror[off : off + len(data)] = data
        assert img.read(0, size) == bytes(mirror)
    raw_path.write_bytes(bytes(mirror))
    assert_clean(img_path)
    qemu_compare(img_path, raw_path)
