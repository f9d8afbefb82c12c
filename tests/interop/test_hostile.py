"""Hostile images: QEMU's open-time sanity limits (QEMU_FACTS.md 4.7), backing / data file
references, bounded resources, and corruption found at run time.

Every image starts valid (made by qemu-img) and has one field broken. Each refusal must be
a qcow2kit.Qcow2Error (a FormatError for broken bytes) whose message names the field, the
value and the limit; on the command line, `qcow2kit: ...` and a non-zero exit.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit import CorruptionError, FormatError, ImageStateError, Qcow2Error
from qcow2kit.cli.main import main as cli_main
from tests.helpers import qemu_img, qemu_io

MiB = 1 << 20


def _u(buf: bytearray, off: int, width: int, value: int) -> None:
    buf[off : off + width] = value.to_bytes(width, "big")


def _get(buf: bytes | bytearray, off: int, width: int) -> int:
    return int.from_bytes(buf[off : off + width], "big")


def _ext_offset(buf: bytes | bytearray, ext_type: int) -> int:
    """Byte offset of a header extension's {type, length} header."""
    pos = _get(buf, 100, 4)
    while True:
        t, n = struct.unpack_from(">II", buf, pos)
        if t == ext_type:
            return pos
        if t == 0:
            raise AssertionError(f"no extension {ext_type:#x}")
        pos += 8 + ((n + 7) & ~7)


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Path]:
    """make(name, *create options, size=..., writes=...) -> a qemu-made image."""

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


def _patch(path: Path, fn: Callable[[bytearray], None]) -> Path:
    buf = bytearray(path.read_bytes())
    fn(buf)
    path.write_bytes(bytes(buf))
    return path


def _refused(path: Path, *needles: str, cls: type[Exception] = FormatError) -> str:
    with pytest.raises(cls) as err:
        qcow2kit.open(str(path), "r").close()
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ---- header limits ---------------------------------------------------------------

# (name, header field offset, width, bad value, error class, words the message must hold)
HEADER_CASES = [
    ("magic", 0, 4, 0x514649FA, FormatError, ["not in qcow2 format"]),
    ("version", 4, 4, 4, Qcow2Error, ["version 4"]),
    ("cluster_bits-small", 20, 4, 8, FormatError, ["cluster_bits 8", "9..21"]),
    ("cluster_bits-large", 20, 4, 22, FormatError, ["cluster_bits 22", "9..21"]),
    ("header_length-short", 100, 4, 96, FormatError, ["header_length 96", "104"]),
    ("header_length-long", 100, 4, 65536 + 8, FormatError, ["header_length 65544", "65536"]),
    ("backing_file_offset", 8, 8, 65537, FormatError, ["backing_file_offset 65537", "cluster 0"]),
    ("crypt_method", 32, 4, 1, Qcow2Error, ["crypt_method 1"]),
    ("refcount_order", 96, 4, 7, FormatError, ["refcount_order 7", "6"]),
    ("refcount_table_clusters-zero", 56, 4, 0, FormatError, ["refcount_table_clusters is 0"]),
    ("refcount_table_clusters-8MiB", 56, 4, 129, FormatError,
     ["refcount_table_clusters 129", "128 clusters", str(8 * MiB)]),
    ("refcount_table_offset-unaligned", 48, 8, 0x10200, FormatError,
     ["refcount_table_offset 0x10200", "aligned", "65536"]),
    ("refcount_table_offset-2^56", 48, 8, 1 << 56, FormatError,
     ["refcount_table_offset 0x100000000000000", "2^56"]),
    ("refcount_table_offset-past-eof", 48, 8, 0x100000, FormatError,
     ["refcount_table_offset 0x100000", "ends past the end of the file"]),
    ("l1_size-32MiB", 36, 4, (32 * MiB) // 8 + 1, FormatError, ["l1_size 4194305", "4194304"]),
    ("l1_size-too-small", 36, 4, 0, FormatError, ["l1_size 0", "smaller", "needs"]),
    ("l1_size-past-eof", 36, 4, 100_000, FormatError,
     ["l1_table_offset", "l1_size 100000", "800000 bytes", "ends past the end of the file"]),
    ("l1_table_offset-unaligned", 40, 8, 0x30008, FormatError, ["l1_table_offset 0x30008", "aligned"]),
    ("l1_table_offset-2^56", 40, 8, 1 << 56, FormatError, ["l1_table_offset", "2^56"]),
    ("size-too-big", 24, 8, 1 << 63, FormatError, ["virtual size 9223372036854775808"]),
    ("nb_snapshots-limit", 60, 4, 65537, FormatError, ["nb_snapshots 65537", "65536"]),
    ("snapshots_offset-zero", 60, 4, 1, FormatError, ["snapshots_offset is 0", "nb_snapshots is 1"]),
    ("incompatible-unknown", 72, 8, 1 << 20, Qcow2Error, ["Unsupported qcow2 feature", "bit 20"]),
    ("compression-bit-without-type", 72, 8, 1 << 3, FormatError, ["compression_type 0", "feature bit"]),
    ("compression_type-unknown", 104, 1, 7, Qcow2Error, ["compression type 7"]),
    ("data-file-bit-without-name", 72, 8, 1 << 2, FormatError, ["'data-file' is required"]),
    ("data-file-raw-without-data-file", 88, 8, 1 << 1, FormatError, ["data-file-raw", "autoclear bit 1"]),
]


# `info` reads the header only (like qemu-img info it does not need the data file itself)
INFO_SKIPS = {"data-file-bit-without-name"}


@pytest.mark.parametrize("case", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_header_limits(make: Callable[..., Path], case: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    name, off, width, value, cls, needles = case
    path = _patch(make(), lambda b: _u(b, off, width, value))
    before = hashlib.sha256(path.read_bytes()).digest()
    _refused(path, *needles, cls=cls)
    for mode in ("r", "r+"):
        with pytest.raises(cls):
            qcow2kit.open(str(path), mode, backing=False).close()
    if name not in INFO_SKIPS:
        assert cli_main(["info", "-f", "qcow2", str(path)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("qcow2kit: ") and "Traceback" not in err
    assert hashlib.sha256(path.read_bytes()).digest() == before


# QEMU reads tables past the end of the file as zeros, does not apply the 2^56 limit to
# header table offsets, and still opens AES images: qcow2kit is stricter on these
QEMU_LENIENT = {"l1_size-past-eof", "refcount_table_offset-past-eof", "snapshots_offset-zero",
                "crypt_method", "refcount_table_offset-2^56", "l1_table_offset-2^56"}


def test_qemu_agrees_the_cases_are_broken(make: Callable[..., Path]) -> None:
    """The oracle: qemu-io (a full open) refuses the same images."""
    for name, off, width, value, _cls, _needles in HEADER_CASES:
        if name in QEMU_LENIENT:
            continue
        path = _patch(make(f"{name}.qcow2", writes=()),
                      lambda b, o=off, w=width, v=value: _u(b, o, w, v))  # type: ignore[misc]
        res = subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", str(path)],
                             capture_output=True, text=True)
        assert res.returncode != 0, (name, res.stdout)


def test_backing_name_limits(make: Callable[..., Path], tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", str(tmp_path / "base.qcow2"), "4M")
    path = make("o.qcow2", "backing_file=base.qcow2", "backing_fmt=qcow2", writes=())
    buf = bytearray(path.read_bytes())
    bf_off = _get(buf, 8, 8)
    _u(buf, 16, 4, 1024)
    path.write_bytes(bytes(buf))
    _refused(path, "backing_file_size 1024", "1023")
    _u(buf, 16, 4, 65536 - bf_off + 1)
    path.write_bytes(bytes(buf))
    _refused(path, f"backing_file_size {65536 - bf_off + 1}")


def test_extension_limits(make: Callable[..., Path]) -> None:
    path = make("e.qcow2")
    qemu_img("bitmap", "--add", str(path), "b0")
    good = path.read_bytes()
    bm = _ext_offset(good, 0x23852875)
    ft = _ext_offset(good, 0x6803F857)
    cases: list[tuple[Callable[[bytearray], None], list[str]]] = [
        (lambda b: _u(b, ft + 4, 4, 65500), ["header extension 0x6803f857", "length 65500"]),
        (lambda b: _u(b, bm + 4, 4, 16), ["bitmaps extension", "length 16", "24"]),
        (lambda b: _u(b, bm + 12, 4, 1), ["bitmaps extension", "reserved"]),
        (lambda b: _u(b, bm + 8, 4, 0), ["nb_bitmaps is 0"]),
        (lambda b: _u(b, bm + 8, 4, 65536), ["nb_bitmaps 65536", "65535"]),
        (lambda b: _u(b, bm + 16, 8, 1024 * 65535 + 1), ["directory_size 67107841", "67107840"]),
        (lambda b: _u(b, bm + 24, 8, 0x50200), ["directory_offset 0x50200", "cluster size"]),
        (lambda b: _u(b, bm + 24, 8, 0x7770000), ["directory_offset", "end of the file"]),
        (lambda b: _u(b, bm, 4, 0x0537BE77), ["crypto header extension", "crypt_method 0"]),
    ]
    for patch, needles in cases:
        buf = bytearray(good)
        patch(buf)
        path.write_bytes(bytes(buf))
        _refused(path, *needles)
    # with the bitmaps autoclear bit clear, QEMU ignores a broken extension: so do we
    buf = bytearray(good)
    _u(buf, bm + 8, 4, 0)
    _u(buf, 88, 8, 0)
    path.write_bytes(bytes(buf))
    qcow2kit.open(str(path), "r").close()


def test_backing_format_extension_length(make: Callable[..., Path], tmp_path: Path) -> None:
    qemu_img("create", "-f", "qcow2", str(tmp_path / "base.qcow2"), "4M")
    path = make("o.qcow2", "backing_file=base.qcow2", "backing_fmt=qcow2", writes=())
    buf = bytearray(path.read_bytes())
    hlen = _get(buf, 100, 4)
    assert _get(buf, 8, 8) > hlen + 32
    # the extension area rewritten: a 16-byte format name (fits the area, not QEMU's
    # 16-byte buffer with its NUL), then the end marker
    buf[hlen : hlen + 32] = struct.pack(">II16sII", 0xE2792ACA, 16, b"qcow2xxxxxxxxxxx", 0, 0)
    path.write_bytes(bytes(buf))
    _refused(path, "backing format extension", "length 16", "15")


def test_snapshot_table_limits(make: Callable[..., Path]) -> None:
    path = make("s.qcow2")
    qemu_img("snapshot", "-c", "s1", str(path))
    good = path.read_bytes()
    snap = _get(good, 64, 8)
    buf = bytearray(good)
    _u(buf, snap + 36, 4, 1025)  # extra_data_size
    path.write_bytes(bytes(buf))
    _refused(path, "extra_data_size 1025", "1024")
    buf = bytearray(good)
    _u(buf, snap + 8, 4, (32 * MiB) // 8 + 1)  # the snapshot's l1_size
    path.write_bytes(bytes(buf))
    _refused(path, "l1_size 4194305", "L1 limit")
    buf = bytearray(good)
    _u(buf, snap, 8, 0x12345)
    path.write_bytes(bytes(buf))
    _refused(path, "l1_table_offset 0x12345", "not aligned")
    buf = bytearray(good)
    _u(buf, 60, 4, 400_000 // 40)  # more entries than the file can hold
    path.write_bytes(bytes(buf))
    _refused(path, "snapshots_offset", "nb_snapshots 10000", "ends past the end of the file")
    buf = bytearray(good)
    _u(buf, snap + 12, 2, 0xFFFF)  # id_len: the entry runs past the table
    path.write_bytes(bytes(buf))
    _refused(path, "snapshot table entry 0 runs past the end")


def test_no_allocation_before_the_file_size_check(make: Callable[..., Path]) -> None:
    """The largest tables a header may announce (32 MiB L1, 8 MiB reftable, 65536
    snapshots) in a tiny file: refused quickly, without reading or allocating them."""
    import tracemalloc

    path = make(writes=())
    for off, width, value in ((36, 4, (32 * MiB) // 8), (56, 4, 128), (60, 4, 65536)):
        p = _patch(path, lambda b, o=off, w=width, v=value: _u(b, o, w, v))  # noqa: B023
        _patch(p, lambda b: _u(b, 64, 8, 0x30000))  # a snapshot table offset for nb_snapshots
        tracemalloc.start()
        with pytest.raises(FormatError, match="ends past the end of the file"):
            qcow2kit.open(str(p), "r")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4 * MiB, peak
        qemu_img("create", "-f", "qcow2", str(path), "4M")


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


# ---- run time: corruption marks the image, further writes refused, reads go on ----------


def _l1_entry_offset(path: Path, index: int) -> int:
    return _get(path.read_bytes(), 40, 8) + 8 * index


def test_corruption_found_at_run_time_marks_the_image(make: Callable[..., Path]) -> None:
    path = make("c.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k", "write -P 0x22 2M 8k"))
    e0 = _l1_entry_offset(path, 0)
    _patch(path, lambda b: _u(b, e0, 8, _get(b, e0, 8) | 0x2))  # an L1 reserved bit
    with qcow2kit.open(str(path), "r+") as img:
        assert img.read(2 * MiB, 8192) == b"\x22" * 8192  # the other L1 entry is fine
        with pytest.raises(CorruptionError, match="Marking image as corrupt.*reserved bits"):
            img.write(0, b"x" * 100)
        assert img.header.incompatible_features & 2
        with pytest.raises(ImageStateError, match="corrupt"):
            img.write(2 * MiB, b"y")
        with pytest.raises(ImageStateError, match="corrupt"):
            img.discard(2 * MiB, 4096)
        with pytest.raises(ImageStateError, match="corrupt"):
            img.write_zeroes(2 * MiB, 4096)
        assert img.read(2 * MiB, 8192) == b"\x22" * 8192  # reads go on working
    assert _get(path.read_bytes(), 72, 8) & 2  # the corrupt bit is on disk
    with pytest.raises(ImageStateError, match="Image is corrupt; cannot be opened read/write"):
        qcow2kit.open(str(path), "r+")
    with qcow2kit.open(str(path), "r") as img:
        assert img.read(2 * MiB, 8192) == b"\x22" * 8192
    info = qemu_img("info", "--output=json", "-U", str(path)).stdout
    assert '"corrupt": true' in info


def test_read_only_corruption_does_not_write(make: Callable[..., Path]) -> None:
    path = make("c.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k",))
    e0 = _l1_entry_offset(path, 0)
    _patch(path, lambda b: _u(b, e0, 8, _get(b, e0, 8) | 0x4))
    before = (hashlib.sha256(path.read_bytes()).digest(), path.stat().st_mtime_ns)
    with qcow2kit.open(str(path), "r") as img, pytest.raises(CorruptionError):
        img.read(0, 4096)
    assert (hashlib.sha256(path.read_bytes()).digest(), path.stat().st_mtime_ns) == before


def test_allocation_overlapping_metadata_is_refused(make: Callable[..., Path]) -> None:
    """A refcount of 0 on the active L2 table: the next allocation would hand it out and
    overwrite it. Refused like QEMU's overlap check, the image marked corrupt, the table
    left intact."""
    path = make("o.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k",))
    buf = bytearray(path.read_bytes())
    l2 = _get(buf, _l1_entry_offset(path, 0), 8) & 0x00FFFFFFFFFFFE00
    refblock = _get(buf, _get(buf, 48, 8), 8)
    _u(buf, refblock + 2 * (l2 // 4096), 2, 0)
    path.write_bytes(bytes(buf))
    with qcow2kit.open(str(path), "r+") as img:
        with pytest.raises(CorruptionError, match="overlaps with an active L2 table"):
            img.write(2 * MiB, b"z" * 4096)  # needs a new L2 table
        assert img.read(0, 8192) == b"\x11" * 8192
    after = path.read_bytes()
    assert after[l2 : l2 + 4096] == buf[l2 : l2 + 4096]
    assert _get(after, 72, 8) & 2


def test_missing_refblock_zero_does_not_hang_or_overwrite_the_header(make: Callable[..., Path]) -> None:
    """Reftable entry 0 cleared: every cluster reads refcount 0, so the next allocation
    would land on the refcount table itself. Refused quickly; header and tables intact
    except for the corrupt bit."""
    path = make("m.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k",))
    rt = _get(path.read_bytes(), 48, 8)
    _patch(path, lambda b: _u(b, rt, 8, 0))
    before = path.read_bytes()
    t0 = time.monotonic()
    with qcow2kit.open(str(path), "r+") as img:
        with pytest.raises(CorruptionError, match="overlaps with the refcount table"):
            img.write(2 * MiB, b"q" * 4096)
        assert img.read(0, 8192) == b"\x11" * 8192
    assert time.monotonic() - t0 < 10
    after = path.read_bytes()
    assert _get(after, 72, 8) == _get(before, 72, 8) | 2
    assert after[80:] == before[80:] and after[:72] == before[:72]


def test_in_place_target_past_the_end_is_corruption(make: Callable[..., Path]) -> None:
    """An L2 entry (COPIED) pointing far past the end of the file: a write there would
    make a huge sparse file (or fail with EFBIG); it is corruption instead."""
    path = make("p.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k",))
    buf = bytearray(path.read_bytes())
    l2 = _get(buf, _l1_entry_offset(path, 0), 8) & 0x00FFFFFFFFFFFE00
    _u(buf, l2, 8, (1 << 63) | (1 << 50))
    path.write_bytes(bytes(buf))
    size = path.stat().st_size
    with qcow2kit.open(str(path), "r+") as img:
        assert img.read(0, 4096) == bytes(4096)  # reads past the end read zeros
        with pytest.raises(CorruptionError, match="beyond the end of the image file"):
            img.write(0, b"w" * 4096)
    assert path.stat().st_size == size


def test_cli_reports_corruption_and_limits(make: Callable[..., Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = _patch(make(), lambda b: _u(b, 20, 4, 30))
    for verb in (["info"], ["map"], ["check"], ["compare", str(path)], ["convert", "-O", "raw"]):
        argv = [*verb, str(path)]
        if verb[0] == "convert":
            argv.append(str(path.with_suffix(".raw")))
        assert cli_main(argv) in (1, 2), verb  # compare: 2 for errors, as qemu-img
        err = capsys.readouterr().err
        assert err.startswith("qcow2kit: ") and "cluster_bits 30" in err, (verb, err)


def test_read_only_open_of_hostile_images_never_writes(make: Callable[..., Path]) -> None:
    """A dirty image (lazy refcounts, killed writer) opened read-only is not repaired."""
    path = make("z.qcow2", "cluster_size=4096", "lazy_refcounts=on", writes=("write -P 0x11 0 8k",))
    _patch(path, lambda b: _u(b, 72, 8, _get(b, 72, 8) | 1))
    os.chmod(path, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    before = (hashlib.sha256(path.read_bytes()).digest(), path.stat().st_mtime_ns)
    with qcow2kit.open(str(path), "r") as img:
        assert img.read(0, 8192) == b"\x11" * 8192
    assert (hashlib.sha256(path.read_bytes()).digest(), path.stat().st_mtime_ns) == before
    res = subprocess.run(["qemu-img", "check", "-U", str(path)], capture_output=True, text=True)
    assert res.returncode in (0, 3)


def test_snapshot_table_size_limit() -> None:
    """QEMU_MAX_SNAPSHOTS_SIZE: the table is read at most 64 MiB deep; an entry that ends
    past that is refused with the limit named."""
    from qcow2kit.format import constants as C
    from qcow2kit.format.snapshot import parse_snapshots

    entry = struct.pack(">QIHHIIQII", 0, 0, 0, 0, 0, 0, 0, 0, 1024) + bytes(1024)
    n = C.MAX_SNAPSHOT_TABLE_BYTES // len(entry)
    tail = struct.pack(">QIHHIIQII", 0, 0, 300, 0, 0, 0, 0, 0, 0)  # its id runs past 64 MiB
    buf = entry * n + tail
    buf += bytes(C.MAX_SNAPSHOT_TABLE_BYTES - len(buf))
    with pytest.raises(FormatError, match="snapshot table too big.*67108864"):
        parse_snapshots(buf, n + 1, 65536)
    assert len(parse_snapshots(buf, n, 65536)) == n


def test_storage_refuses_reads_far_past_the_end(tmp_path: Path) -> None:
    """A length or offset taken from hostile metadata (a bitmap table size, a directory
    size) never turns into a buffer of that size: refused before os.pread allocates."""
    from qcow2kit.io.file import FileStorage

    path = tmp_path / "f"
    path.write_bytes(b"abc")
    st = FileStorage(str(path), lock=False)
    try:
        assert st.pread(1, 5) == b"bc\0\0\0"  # a short way past the end reads zeros
        with pytest.raises(CorruptionError, match="far past the end"):
            st.pread(0, 1 << 40)
        with pytest.raises(CorruptionError, match="outside any file"):
            st.pread((1 << 63) - 10, 100)
        with pytest.raises(CorruptionError, match="outside any file"):
            st.pread(-1, 1)
    finally:
        st.close()


@pytest.mark.parametrize("target", ["l1", "reftable", "refblock", "header", "l2"])
def test_in_place_write_onto_metadata_is_refused(make: Callable[..., Path], target: str) -> None:
    """An L2 entry (COPIED) aimed at a metadata cluster: a guest write there would rewrite
    that metadata. Refused like QEMU's overlap check; the image marked corrupt, the
    metadata intact."""
    path = make("w.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k",))
    buf = bytearray(path.read_bytes())
    l1 = _get(buf, 40, 8)
    l2 = _get(buf, l1, 8) & 0x00FFFFFFFFFFFE00
    rt = _get(buf, 48, 8)
    where = {"l1": l1, "reftable": rt, "refblock": _get(buf, rt, 8), "header": 0, "l2": l2}[target]
    names = {"l1": "the active L1 table", "reftable": "the refcount table",
             "refblock": "a refcount block", "header": "the image header", "l2": "an active L2 table"}
    if target == "header":
        _u(buf, l2 + 8, 8, (1 << 63) | 1)  # a preallocated zero cluster at host offset 0
    else:
        _u(buf, l2 + 8, 8, (1 << 63) | where)
    path.write_bytes(bytes(buf))
    before = path.read_bytes()
    with qcow2kit.open(str(path), "r+") as img:
        if target != "header":
            with pytest.raises(CorruptionError, match=f"overlaps with {names[target]}"):
                img.write(4096, b"\xee" * 4096)
            assert img.read(0, 4096) == b"\x11" * 4096
        else:  # offset 0 is "unallocated" in a standard L2 entry: written elsewhere, fine
            img.write(4096, b"\xee" * 4096)
            assert img.read(4096, 4096) == b"\xee" * 4096
    after = path.read_bytes()
    if target != "header":
        assert after[where : where + 4096] == before[where : where + 4096]
        assert _get(after, 72, 8) & 2


def test_l2_table_in_place_onto_metadata_is_refused(make: Callable[..., Path]) -> None:
    path = make("t.qcow2", "cluster_size=4096", writes=("write -P 0x11 0 8k",))
    buf = bytearray(path.read_bytes())
    l1, rt = _get(buf, 40, 8), _get(buf, 48, 8)
    _u(buf, l1 + 8, 8, (1 << 63) | rt)  # L1 entry 1 (COPIED): "its L2 table" is the reftable
    path.write_bytes(bytes(buf))
    before = path.read_bytes()
    with qcow2kit.open(str(path), "r+") as img:
        with pytest.raises(CorruptionError, match="L2 table at .* overlaps with the refcount table"):
            img.write(2 * MiB, b"\xee" * 4096)
    after = path.read_bytes()
    assert after[rt : rt + 4096] == before[rt : rt + 4096]
