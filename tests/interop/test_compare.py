"""compare over many pieces against qemu-img compare: the second image is read on a thread a
few pieces ahead into recycled buffers (ops/compare.py over convert/source.ReadAhead), so the
verdict and the first mismatch must not depend on which buffer a piece landed in, on where
the mismatch lies among the pieces, or on the read-ahead being stopped early."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcow2kit.cli.main import main
from qcow2kit.ops.compare import compare
from qcow2kit.ops.convert import CHUNK_BYTES
from tests.helpers import qemu_img

M = 1 << 20
SIZE = 40 * CHUNK_BYTES  # 40 pieces: several times round the buffers


def _sparse_raw(path: Path, marks: dict[int, bytes], size: int = SIZE) -> Path:
    """A sparse raw file holding `marks` (offset -> bytes): each mark is its own data
    extent, so compare reads many small pieces and skips the holes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in marks.items():
            f.seek(off)
            f.write(data)
    return path


def _marks() -> dict[int, bytes]:
    # one 8 KiB stamp near the start of every piece, plus one that spans two pieces
    out = {k * CHUNK_BYTES + 12345: bytes([k % 251 + 1]) * 8192 for k in range(40)}
    out[17 * CHUNK_BYTES - 4096] = b"\x77" * 8192
    return out


def _qemu(a: Path, b: Path) -> tuple[int, str]:
    res = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(a), str(b), check=False)
    return res.returncode, res.stdout


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    raw = _sparse_raw(tmp_path / "a.raw", _marks())
    q = tmp_path / "b.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(q))
    return raw, q


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0x5A]) if old else b"\x5a")


def _same_verdict(a: Path, b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _qemu(a, b)
    assert (main(["compare", "-f", "raw", "-F", "qcow2", str(a), str(b)]),
            capsys.readouterr().out) == (rc, out)


def test_identical_over_many_pieces(pair: tuple[Path, Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    raw, q = pair
    assert compare(str(raw), str(q)).identical
    _same_verdict(raw, q, capsys)


@pytest.mark.parametrize("where", [
    0 * CHUNK_BYTES + 12345,           # the first piece
    23 * CHUNK_BYTES + 12345 + 8191,   # deep in, last byte of a stamp
    17 * CHUNK_BYTES + 100,            # the stamp that spans two pieces, second half
    39 * CHUNK_BYTES + 12345 + 5000,   # the last piece
    30 * CHUNK_BYTES + 7 * M,          # inside a hole: the raw side gains data there
])
def test_first_mismatch_like_qemu(pair: tuple[Path, Path], where: int,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    raw, q = pair
    _flip(raw, where)
    res = compare(str(raw), str(q))
    assert not res.identical and res.mismatch_offset == where // 512 * 512
    _same_verdict(raw, q, capsys)


def test_two_mismatches_report_the_first(pair: tuple[Path, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    raw, q = pair
    _flip(raw, 31 * CHUNK_BYTES + 12345 + 10)
    _flip(raw, 9 * CHUNK_BYTES + 12345 + 4000)
    assert compare(str(raw), str(q)).mismatch_offset == (9 * CHUNK_BYTES + 12345 + 4000) // 512 * 512
    _same_verdict(raw, q, capsys)


def test_longer_image_with_data_in_its_tail(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    marks = _marks()
    short = _sparse_raw(tmp_path / "short.raw", marks)
    marks[SIZE + 3 * CHUNK_BYTES + 999] = b"\x01"
    long = tmp_path / "long.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2",
             str(_sparse_raw(tmp_path / "long.raw", marks, SIZE + 6 * CHUNK_BYTES)), str(long))
    res = compare(str(short), str(long))
    assert not res.identical and res.mismatch_offset == (SIZE + 3 * CHUNK_BYTES + 999) // 512 * 512
    _same_verdict(short, long, capsys)
