"""A read-write open keeps no promise it will not maintain (issue 10, "Feature bits"):
unknown autoclear bits are cleared before anything else is written, and enabled persistent
dirty bitmaps (which qcow2kit does not update) are marked in use, i.e. inconsistent, so that
no backup tool trusts a bitmap that calls our writes "clean". qemu-img is the oracle."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.image import Image
from qcow2kit.testing.faults import RecordingStorage, check_crash_states
from tests.helpers import qemu_check, qemu_img, qemu_io

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


@pytest.mark.parametrize("disabled", [False, True])
def test_enabled_bitmap_marked_in_use_by_a_write(tmp_path: Path, disabled: bool) -> None:
    img = tmp_path / "b.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "4M")
    qemu_io(img, "write -P 7 1M 64k")
    args = ["bitmap", "--add", str(img), "b0"]
    if disabled:
        args.insert(2, "--disable")
    qemu_img(*args)
    before = _bitmaps(img)
    assert "in-use" not in before[0]["flags"]  # type: ignore[operator]
    with qcow2kit.open(str(img), "r+") as disk:
        disk.write(0, b"z" * 65536)
    after = _bitmaps(img)
    assert len(after) == 1 and after[0]["name"] == "b0"
    flags = after[0]["flags"]
    if disabled:
        # a disabled bitmap records nothing and stays valid
        assert flags == before[0]["flags"]
    else:
        # QEMU and every backup tool now refuse to trust it: it cannot call our write clean
        assert "in-use" in flags  # type: ignore[operator]
    assert _autoclear(img) & 1, "the extension stays valid (no leaked bitmap clusters)"
    out = qemu_check(img)
    assert out["rc"] == 0 and not out.get("leaks") and not out.get("corruptions"), out
    # the inconsistent bitmap can only be removed, as QEMU says
    res = qemu_img("bitmap", "--clear", str(img), "b0", check=False)
    assert (res.returncode != 0) == (not disabled), res.stderr
    qemu_img("bitmap", "--remove", str(img), "b0")
    assert qemu_check(img)["rc"] == 0


def test_marking_bitmaps_in_use_is_crash_safe(tmp_path: Path) -> None:
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "4M")
    qemu_io(img, "write -P 3 0 256k")
    qemu_img("bitmap", "--add", str(img), "b0")
    qemu_img("bitmap", "--add", str(img), "b1")
    initial = img.read_bytes()
    storage = RecordingStorage.from_file(img)
    with Image(storage) as disk:
        disk.write(4096, b"q" * 8192)
    final = tmp_path / "final.qcow2"
    final.write_bytes(storage.contents())
    assert all("in-use" in bm["flags"] for bm in _bitmaps(final))  # type: ignore[operator]

    def verify(state: str) -> None:
        # once our write can be seen, no bitmap may still claim to be valid: each is in use,
        # or the extension as a whole is flagged inconsistent (autoclear bit 0 clear)
        path = Path(state)
        if not _autoclear(path) & 1:
            return
        write_visible = qemu_img("compare", "-U", str(final), state, check=False).returncode == 0
        if write_visible:
            assert all("in-use" in bm["flags"] for bm in _bitmaps(path))  # type: ignore[operator]

    (tmp_path / "states").mkdir()
    n = check_crash_states(initial, storage.log, tmp_path / "states", verify=verify,
                           reorder_samples=2, max_states=120)
    assert n >= 4
