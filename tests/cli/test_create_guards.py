"""create must never truncate an image another process holds, and must fit small clusters."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import qcow2kit
from tests.conftest import QEMU_IO, assert_clean, qemu_img, wait_for_lock


def test_create_over_locked_image_leaves_it_alone(tmp_path: Path) -> None:
    img = tmp_path / "busy.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "1M")
    before = img.read_bytes()
    assert QEMU_IO is not None
    holder = subprocess.Popen([QEMU_IO, str(img)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lock(img)
        with pytest.raises(qcow2kit.LockError, match='Failed to get "write" lock'):
            qcow2kit.create(str(img), 2 << 20)
        assert img.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


def test_512_byte_clusters_with_backing_file(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x11" * (1 << 20))
    img = tmp_path / "top.qcow2"
    qcow2kit.create(str(img), None, cluster_size=512, backing_file=str(base), backing_fmt="raw")
    assert_clean(img)
    with qcow2kit.open(str(img)) as image:
        assert image.read(4096, 16) == b"\x11" * 16
