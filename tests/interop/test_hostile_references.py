"""Hostile images: backing and data file references. Only plain files are followed (no
protocols, FIFOs, directories or devices), backing chains may not loop (directly, through
other files, a symlink or a ./ spelling) and are bounded in depth, and a backing name with a
NUL byte is refused; each image stays inspectable with backing=False.

Every image starts valid (made by qemu-img) and has one reference broken. Each refusal must
be a qcow2kit.Qcow2Error whose message names the problem; on the command line, a non-zero
exit. Open-time header limits: test_hostile.py.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit import Qcow2Error
from qcow2kit.cli.main import main as cli_main
from tests.helpers import qemu_img
from tests.interop.hostile_common import MiB, image_maker
from tests.interop.hostile_common import get as _get
from tests.interop.hostile_common import put as _u
from tests.interop.hostile_common import refused as _refused


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Path]:
    """make(name, *create options, size=..., writes=...) -> a qemu-made image."""
    return image_maker(tmp_path)


# ---- backing and data files: plain files only, no loops, bounded depth ------------------


def _set_backing(path: Path, name: str, fmt: str | None = None) -> None:
    """Rewrite the backing name in place (qemu-img rebase -u keeps the header layout)."""
    argv = ["rebase", "-u", "-b", name]
    argv += ["-F", fmt] if fmt else []
    qemu_img(*argv, str(path))


def test_backing_loop_direct(make: Callable[..., Path]) -> None:
    a = make("a.qcow2", writes=())
    _set_backing(a, "a.qcow2", "qcow2")
    _refused(a, "backing chain loops", "a.qcow2")
    with qcow2kit.open(str(a), "r", backing=False) as img:  # inspectable without following
        assert img.header.backing_file == "a.qcow2"
        assert img.read(0, 512) == bytes(512)


def test_backing_loop_through_other_files(make: Callable[..., Path], tmp_path: Path) -> None:
    names = ["a.qcow2", "b.qcow2", "c.qcow2"]
    paths = [make(n, writes=()) for n in names]
    for i, p in enumerate(paths):
        _set_backing(p, names[(i + 1) % 3], "qcow2")
    for p in paths:
        _refused(p, "backing chain loops")
    # through a symlink and a ./ spelling, too
    os.symlink("a.qcow2", tmp_path / "link.qcow2")
    _set_backing(paths[2], "./link.qcow2", "qcow2")
    _refused(paths[0], "backing chain loops")
    # and the info verb does not hang either
    assert cli_main(["info", "--backing-chain", str(paths[0])]) != 0


def test_backing_depth_limit(tmp_path: Path) -> None:
    from qcow2kit.image import MAX_BACKING_DEPTH

    n = MAX_BACKING_DEPTH + 2
    qcow2kit.create(str(tmp_path / "c0.qcow2"), 1 * MiB)
    for i in range(1, n):
        qcow2kit.create(str(tmp_path / f"c{i}.qcow2"), 1 * MiB,
                        backing_file=f"c{i - 1}.qcow2", backing_fmt="qcow2")
    _refused(tmp_path / f"c{n - 1}.qcow2", "deeper than", str(MAX_BACKING_DEPTH))
    with qcow2kit.open(str(tmp_path / f"c{MAX_BACKING_DEPTH - 1}.qcow2"), "r") as img:
        assert img.read(0, 4) == bytes(4)


@pytest.mark.parametrize(
    "name",
    ["nbd://127.0.0.1:1/x", "json:{\"file.driver\":\"nbd\"}", "http://example.invalid/x",
     "ssh://h/x", "file:x.qcow2"],
)
def test_backing_protocols_refused(make: Callable[..., Path], name: str) -> None:
    path = make(writes=())
    _set_backing(path, name, "raw")
    _refused(path, "only plain files", cls=Qcow2Error)
    qcow2kit.open(str(path), "r", backing=False).close()


def test_backing_special_files_refused(make: Callable[..., Path], tmp_path: Path) -> None:
    path = make(writes=())
    os.mkfifo(tmp_path / "fifo")  # opening it would block forever
    (tmp_path / "dir").mkdir()
    for name in ("fifo", "dir", "/dev/zero", "/dev/null"):
        _set_backing(path, name, "raw")
        t0 = time.monotonic()
        _refused(path, "not a regular file", cls=Qcow2Error)
        assert cli_main(["info", "--backing-chain", str(path)]) == 1
        assert cli_main(["map", str(path)]) == 1
        assert cli_main(["map", "--no-backing", "--output=json", str(path)]) == 0
        assert time.monotonic() - t0 < 5
    _set_backing(path, "missing.qcow2", "qcow2")
    _refused(path, "Could not open backing file", "missing.qcow2")
    with qcow2kit.open(str(path), "r", backing=False) as img:
        assert img.backing is None


def test_backing_name_with_nul_and_empty(make: Callable[..., Path], tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", str(tmp_path / "base.qcow2"), "4M")
    path = make("o.qcow2", "backing_file=base.qcow2", "backing_fmt=qcow2", writes=())
    buf = bytearray(path.read_bytes())
    bf_off = _get(buf, 8, 8)
    buf[bf_off + 4] = 0
    path.write_bytes(bytes(buf))
    _refused(path, "NUL byte")
    _u(buf, 16, 4, 0)  # an empty name means no backing file, as in QEMU
    path.write_bytes(bytes(buf))
    with qcow2kit.open(str(path), "r") as img:
        assert img.backing is None


def test_data_file_references(make: Callable[..., Path], tmp_path: Path) -> None:
    path = make("d.qcow2", f"data_file={tmp_path}/d.raw", writes=("write -P 0x22 0 4k",))
    with qcow2kit.open(str(path), "r") as img:
        assert img.read(0, 4096) == b"\x22" * 4096
    good = path.read_bytes()
    hlen = _get(good, 100, 4)
    for name, needle in ((b"nope.raw", "Could not open data file"), (b"/dev/zero", "not a regular file"),
                         (b"nbd:x:1", "only plain files"), (b"", "not a regular file")):
        buf = bytearray(good)
        ext = struct.pack(">II", 0x44415441, len(name)) + name + bytes(-len(name) % 8)
        buf[hlen : hlen + len(ext) + 8] = ext + bytes(8)  # the only extension, then the end
        path.write_bytes(bytes(buf))
        _refused(path, needle, cls=Qcow2Error)

