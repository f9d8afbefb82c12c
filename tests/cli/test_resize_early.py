"""`qcow2kit resize`: the argparse-free command line and the shrink's early discard
(ops/shrink_discard) as a user runs them: same result as qemu-img's shrink, nothing punched
in an image another process holds, a failing punch costs nothing but time."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qcow2kit.cli import resize as cli_resize
from qcow2kit.cli.main import build_parser, main
from qcow2kit.io.file import FileStorage
from qcow2kit.ops import shrink_discard
from tests.helpers import assert_clean, qemu_compare, qemu_img, qemu_io

M = 1 << 20

ACCEPTED = [
    ["x.qcow2", "1G"],
    ["--shrink", "x.qcow2", "-1G"],
    ["x.qcow2", "--shrink", "-q", "+512M"],
    ["--preallocation", "full", "x.qcow2", "2G"],
    ["--preallocation=metadata", "-f", "qcow2", "x.qcow2", "2G"],
    ["--compact", "--shrink", "-q", "x.qcow2", "1M"],
    ["-f", "raw", "x", "-5"],
]
DECLINED = [
    [],
    ["x.qcow2"],
    ["x.qcow2", "-h"],
    ["-h", "x.qcow2", "1G"],
    ["--shr", "x.qcow2", "1G"],
    ["--preallocation", "none", "x.qcow2", "1G"],
    ["--", "x.qcow2", "1G"],
    ["x.qcow2", "--", "-1G"],
    ["a", "b", "1G"],
    ["-f", "-q", "x.qcow2", "1G"],
]


@pytest.mark.parametrize("rest", ACCEPTED, ids=" ".join)
def test_same_as_argparse(rest: list[str]) -> None:
    fast = cli_resize.fast_args(rest)
    assert fast is not None
    parser = build_parser(["resize"])
    parsed = parser.parse_args(["resize", *rest[:-1], "--", rest[-1]])
    assert vars(fast) == vars(parsed)


@pytest.mark.parametrize("rest", DECLINED, ids=" ".join)
def test_declined(rest: list[str]) -> None:
    assert cli_resize.fast_args(rest) is None


def _full_image(path: Path, size: int = 48 * M) -> None:
    qemu_img("create", "-f", "qcow2", str(path), str(size))
    qemu_io(path, f"write -P 5 {size // 2} {size // 2}", f"write -P 6 0 {size // 2}")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What every shrink_discard.start call returned."""
    calls: list[object] = []
    real = shrink_discard.start

    def spy(storage: FileStorage, new_size: int) -> object:
        result = real(storage, new_size)
        calls.append(result)
        return result

    monkeypatch.setattr(shrink_discard, "start", spy)
    return calls


def test_shrink_with_early_discard_matches_qemu(tmp_path: Path, started: list[object]) -> None:
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    _full_image(ours)
    shutil.copy(ours, theirs)
    mirror = tmp_path / "mirror.raw"
    qemu_img("convert", "-O", "raw", str(ours), str(mirror))
    os.truncate(mirror, 10 * M + 512)
    assert main(["resize", "-q", "--shrink", str(ours), str(10 * M + 512)]) == 0
    assert any(isinstance(s, shrink_discard.EarlyDiscard) for s in started)
    qemu_img("resize", "-q", "--shrink", str(theirs), str(10 * M + 512))
    assert_clean(ours)
    qemu_compare(ours, mirror)
    qemu_compare(ours, theirs, "qcow2", "qcow2")
    assert ours.stat().st_size <= theirs.stat().st_size
    assert ours.stat().st_blocks <= theirs.stat().st_blocks


def test_relative_shrink_through_the_program(tmp_path: Path) -> None:
    """As a user runs it: a new process, the argparse-free path, a relative size."""
    img = tmp_path / "p.qcow2"
    _full_image(img)
    mirror = tmp_path / "mirror.raw"
    qemu_img("convert", "-O", "raw", str(img), str(mirror))
    os.truncate(mirror, 16 * M)
    res = subprocess.run([sys.executable, "-m", "qcow2kit", "resize", "--shrink", str(img), "-32M"],
                         capture_output=True, text=True)
    assert (res.returncode, res.stdout, res.stderr) == (0, "Image resized.\n", "")
    assert_clean(img)
    qemu_compare(img, mirror)


def test_nothing_is_punched_in_an_image_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               started: list[object]) -> None:
    img = tmp_path / "busy.qcow2"
    _full_image(img)
    before = _digest(img)
    holder = FileStorage(str(img), True)  # another user of the image, e.g. a running VM
    try:
        assert main(["resize", "-q", "--shrink", str(img), "1M"]) == 1
    finally:
        holder.close()
    assert "Failed to get" in capsys.readouterr().err
    assert started == []
    assert _digest(img) == before


def test_a_failing_punch_costs_nothing_but_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                started: list[object]) -> None:
    img = tmp_path / "f.qcow2"
    _full_image(img)
    mirror = tmp_path / "mirror.raw"
    qemu_img("convert", "-O", "raw", str(img), str(mirror))
    os.truncate(mirror, 4 * M)
    real = FileStorage.punch_hole
    calls = []

    def failing(self: FileStorage, offset: int, length: int) -> None:
        calls.append(offset)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(self, offset, length)

    monkeypatch.setattr(FileStorage, "punch_hole", failing)
    assert main(["resize", "-q", "--shrink", str(img), "4M"]) == 0
    discard = started[0]
    assert isinstance(discard, shrink_discard.EarlyDiscard) and isinstance(discard.error, OSError)
    assert_clean(img)
    qemu_compare(img, mirror)


def test_refused_sizes_punch_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "r.qcow2"
    _full_image(img)
    before = _digest(img)
    for size in ("10M+1", "1000", "0", "-48M", "-64M"):
        assert main(["resize", "-q", "--shrink", str(img), size]) == 1
    assert main(["resize", "-q", str(img), "1M"]) == 1  # a shrink without --shrink
    capsys.readouterr()
    assert _digest(img) == before
