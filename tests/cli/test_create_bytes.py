"""`qcow2kit create` writes the same bytes as `qemu-img create` for plain images: header,
extensions (the feature-name table only above 4 KiB clusters, as QEMU 7.2), tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcow2kit.cli.main import main as cli_main
from tests.helpers import qemu_img


@pytest.mark.parametrize("cluster_size", [512, 4096, 8192, 65536])
def test_create_is_byte_identical(tmp_path: Path, cluster_size: int) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    opts = f"cluster_size={cluster_size}"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(theirs), "64M")
    assert cli_main(["create", "-q", "-f", "qcow2", "-o", opts, str(ours), "64M"]) == 0
    assert ours.read_bytes() == theirs.read_bytes()


def test_empty_disk_is_byte_identical_and_grows_clean(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(theirs), "0")
    assert cli_main(["create", "-q", "-f", "qcow2", str(ours), "0"]) == 0
    assert ours.read_bytes() == theirs.read_bytes()
    assert cli_main(["resize", "-q", str(ours), "1M"]) == 0
    from tests.helpers import assert_clean, qemu_io

    qemu_io(ours, "write 0 64k")
    assert_clean(ours)


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("size", ["1M", "3T"])
def test_refcount_widths_are_byte_identical(tmp_path: Path, refcount_bits: int, size: str) -> None:
    """Every refcount width (narrower than a byte too), written without numpy, byte for byte
    as qemu-img writes it; 3 TiB needs an L1 table of several clusters."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    opts = f"refcount_bits={refcount_bits}"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(theirs), size)
    assert cli_main(["create", "-q", "-f", "qcow2", "-o", opts, str(ours), size]) == 0
    assert ours.read_bytes() == theirs.read_bytes()
