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
