"""Shared parts of the hostile-image tests (test_hostile.py, test_hostile_references.py,
test_hostile_runtime.py): qemu-made images (image_maker, behind each module's `make`
fixture), header fields read and patched in place, and the check that an open is refused
with a message holding the expected words (the field, the value, the limit).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit import FormatError
from tests.helpers import qemu_img, qemu_io

MiB = 1 << 20


def put(buf: bytearray, off: int, width: int, value: int) -> None:
    buf[off : off + width] = value.to_bytes(width, "big")


def get(buf: bytes | bytearray, off: int, width: int) -> int:
    return int.from_bytes(buf[off : off + width], "big")


def ext_offset(buf: bytes | bytearray, ext_type: int) -> int:
    """Byte offset of a header extension's {type, length} header."""
    pos = get(buf, 100, 4)
    while True:
        t, n = struct.unpack_from(">II", buf, pos)
        if t == ext_type:
            return pos
        if t == 0:
            raise AssertionError(f"no extension {ext_type:#x}")
        pos += 8 + ((n + 7) & ~7)


def image_maker(tmp_path: Path) -> Callable[..., Path]:
    """make(name, *create options, size=..., writes=...) -> a qemu-made image in tmp_path."""

    def _make(name: str = "h.qcow2", *opts: str, size: str = "4M",
              writes: tuple[str, ...] = ("write -P 0x11 0 64k",)) -> Path:
        path = tmp_path / name
        argv = ["create", "-f", "qcow2"]
        if opts:
            argv += ["-o", ",".join(opts)]
        qemu_img(*argv, str(path), size)
        if writes:
            qemu_io(path, *writes)
        return path

    return _make


def patch_image(path: Path, fn: Callable[[bytearray], None]) -> Path:
    buf = bytearray(path.read_bytes())
    fn(buf)
    path.write_bytes(bytes(buf))
    return path


def refused(path: Path, *needles: str, cls: type[Exception] = FormatError) -> str:
    with pytest.raises(cls) as err:
        qcow2kit.open(str(path), "r").close()
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg
