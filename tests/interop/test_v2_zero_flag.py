"""A zero flag in a version 2 image (the flag exists only from version 3): QEMU 7.2 refuses to
read through such an entry (corruption, EIO); qcow2kit refuses too, for every reader (map,
convert, the API), instead of silently reading zeros. `check` reports nothing, as qemu-img's."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.errors import CorruptionError


def v2_with_zero_entry(tmp_path: Path) -> Path:
    path = tmp_path / "v2.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(path), "4M"],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 7 0 128k", str(path)], check=True)
    with open(path, "r+b") as f:
        l1_offset = struct.unpack(">Q", f.read(48)[40:48])[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset + 8)  # cluster 1: zero flag only
        f.write(struct.pack(">Q", 1))
    return path


@pytest.mark.parametrize("args", [["map", "--output=json"], ["map"], ["convert", "-O", "raw"]])
def test_cli_refuses_like_qemu_img(tmp_path: Path, args: list[str]) -> None:
    path = v2_with_zero_entry(tmp_path)
    tail = [str(tmp_path / "out.raw")] if args[0] == "convert" else []
    ref = subprocess.run(["qemu-img", *args, str(path), *tail], capture_output=True, text=True)
    ours = subprocess.run([sys.executable, "-m", "qcow2kit", *args, str(path), *tail],
                          capture_output=True, text=True)
    assert ref.returncode == 1 and "Zero cluster entry found in pre-v3 image" in ref.stderr
    assert ours.returncode == 1, ours.stderr
    assert "Zero cluster entry found in pre-v3 image" in ours.stderr
    assert "Traceback" not in ours.stderr


def test_reads_refuse_but_other_clusters_read(tmp_path: Path) -> None:
    path = v2_with_zero_entry(tmp_path)
    with qcow2kit.open(path) as img:
        assert img.read(0, 65536) == b"\x07" * 65536  # the cluster before is fine
        with pytest.raises(CorruptionError, match="pre-v3"):
            img.read(65536, 4096)


def test_check_reports_nothing_like_qemu_img(tmp_path: Path) -> None:
    path = v2_with_zero_entry(tmp_path)
    ref = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    ours = subprocess.run([sys.executable, "-m", "qcow2kit", "check", str(path)], capture_output=True,
                          text=True)
    assert (ours.returncode, ours.stdout) == (ref.returncode, ref.stdout)
