"""Hostile images, refused at open: QEMU's open-time sanity limits (QEMU_FACTS.md 4.7) on
header fields, header extensions and the snapshot table, and bounded resources (no table a
header announces is allocated before its size is checked against the file; storage reads
far past the end are refused).

Every image starts valid (made by qemu-img) and has one field broken. Each refusal must be
a qcow2kit.Qcow2Error (a FormatError for broken bytes) whose message names the field, the
value and the limit; on the command line, `qcow2kit: ...` and a non-zero exit.
Backing and data file references: test_hostile_references.py; corruption found at run
time: test_hostile_runtime.py.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit import CorruptionError, FormatError, Qcow2Error
from qcow2kit.cli.main import main as cli_main
from tests.helpers import qemu_img
from tests.interop.hostile_common import MiB, image_maker
from tests.interop.hostile_common import ext_offset as _ext_offset
from tests.interop.hostile_common import get as _get
from tests.interop.hostile_common import patch_image as _patch
from tests.interop.hostile_common import put as _u
from tests.interop.hostile_common import refused as _refused


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Path]:
    """make(name, *create options, size=..., writes=...) -> a qemu-made image."""
    return image_maker(tmp_path)


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


# ---- bounded resources: sizes from hostile metadata are checked before use -------------


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

