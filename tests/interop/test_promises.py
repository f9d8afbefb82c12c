"""A read-write open keeps no promise it will not maintain (issue 10, "Feature bits"):
unknown autoclear bits are cleared before anything else is written. (Persistent dirty
bitmaps, autoclear bit 0, are maintained: tests/interop/test_bitmaps.py.) qemu-img is the
oracle."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import qcow2kit
from qcow2kit.image import Image
from qcow2kit.testing.faults import RecordingStorage
from tests.helpers import qemu_check, qemu_img

AUTOCLEAR_AT = 88


def _autoclear(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(AUTOCLEAR_AT)
        return int(struct.unpack(">Q", f.read(8))[0])


def _set_autoclear(path: Path, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(AUTOCLEAR_AT)
        f.write(struct.pack(">Q", bits))


def _bitmaps(path: Path) -> list[dict[str, object]]:
    info = json.loads(qemu_img("info", "--output=json", "-U", str(path)).stdout)
    data = info.get("format-specific", {}).get("data", {})
    return list(data.get("bitmaps", []))


def test_unknown_autoclear_bit_cleared_by_grow(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "1M")
    _set_autoclear(img, 1 << 63)
    with qcow2kit.open(str(img), "r+") as disk:
        disk.resize(2 << 20)
    assert _autoclear(img) == 0
    out = qemu_check(img)
    assert out["rc"] == 0 and not out.get("leaks") and not out.get("corruptions")


def test_unknown_autoclear_bit_cleared_before_the_first_write(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "1M")
    _set_autoclear(img, (1 << 63) | (1 << 5))
    storage = RecordingStorage.from_file(img)
    with Image(storage) as disk:
        disk.write(0, b"x" * 4096)
    writes = [op for op in storage.log if op[0] == "write"]
    first = writes[0]
    assert first[1] == AUTOCLEAR_AT and first[2] == bytes(8), "autoclear must be cleared first"


def test_read_only_open_leaves_autoclear_alone(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "1M")
    _set_autoclear(img, 1 << 63)
    with qcow2kit.open(str(img)) as disk:
        disk.read(0, 512)
    assert _autoclear(img) == 1 << 63


def test_data_file_raw_bit_is_kept(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={tmp_path / 'a.raw'},data_file_raw=on",
             str(img), "1M")
    assert _autoclear(img) == 2
    with qcow2kit.open(str(img), "r+") as disk:
        disk.write(0, b"y" * 512)
    assert _autoclear(img) == 2
    assert qemu_check(img)["rc"] == 0
