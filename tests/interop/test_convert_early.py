"""The early raw -> qcow2 path of convert (ops/convert/rawpump.py + planned.py): what it
writes is what qemu-img convert writes (same guest content, same allocation, about the
same size, qemu-img check clean), its header is the one ops.create makes, and a failure in
the middle of the copy is a clear error with no thread left behind and no target left."""

from __future__ import annotations

import errno
import os
import random
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from qcow2kit.cli.main import main
from qcow2kit.format.header import Header
from qcow2kit.ops.convert import convert, planned, rawpump
from qcow2kit.ops.create import create
from tests.helpers import assert_clean, map_shape, qemu_compare, qemu_img

MIB = 1 << 20


def _source(path: Path, size: int, seed: int, holes: bool = True) -> None:
    """Random data, written zeros and (with holes) real holes, at odd boundaries."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        pos = 0
        kind = 0
        while pos < size:
            n = min(size - pos, rng.choice([512, 4096, 65536, 70_000, 300_000, MIB]))
            if kind % 3 == 0:
                f.seek(pos)
                f.write(rng.randbytes(n))
            elif kind % 3 == 1 or not holes:
                f.seek(pos)
                f.write(bytes(n))
            kind += 1
            pos += n


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the converts that went the early way."""
    calls: list[int] = []
    real = planned.finish

    def spy(early: planned.Early) -> None:
        calls.append(1)
        real(early)

    monkeypatch.setattr(planned, "finish", spy)
    return calls


def _qemu_opts(options: dict[str, Any]) -> list[str]:
    if not options:
        return []
    text = ",".join(f"{k}={'on' if v is True else 'off' if v is False else v}"
                    for k, v in options.items())
    return ["-o", text]


@pytest.mark.parametrize(
    ("size", "options", "sparse"),
    [
        (6 * MIB, {}, 4096),
        (6 * MIB + 512, {}, 4096),  # ends inside a cluster
        (5 * MIB + 100, {}, 4096),  # ends inside a sector: counted in whole sectors
        (3 * MIB, {"cluster_size": 512, "refcount_bits": 64}, 4096),  # many refcount blocks
        (9 * MIB, {"cluster_size": 4096, "refcount_bits": 8}, 4096),
        (5 * MIB, {"cluster_size": 2 << 20, "refcount_bits": 32}, 4096),
        (4 * MIB, {"compression_type": "zstd", "lazy_refcounts": True}, 4096),
        (4 * MIB, {}, 0),  # -S 0: every cluster written
    ],
)
def test_early_output_matches_qemu(
    tmp_path: Path, taken: list[int], size: int, options: dict[str, Any], sparse: int
) -> None:
    src = tmp_path / "src.raw"
    _source(src, size, seed=size + len(options))
    ours = tmp_path / "ours.qcow2"
    convert(str(src), str(ours), out_fmt="qcow2", options=options, sparse_bytes=sparse)
    assert taken == [1]
    assert_clean(ours)
    qemu_compare(ours, src)
    ref = tmp_path / "ref.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-S", str(sparse), *_qemu_opts(options),
             str(src), str(ref))
    cs = options.get("cluster_size", 65536)
    if cs >= sparse:
        assert map_shape(ours) == map_shape(ref)
    else:
        # qemu keeps zero runs shorter than -S allocated; convert decides per cluster (as
        # its general path does, which writeback caching takes)
        general = tmp_path / "general.qcow2"
        convert(str(src), str(general), out_fmt="qcow2", options=options, sparse_bytes=sparse,
                cache="writeback")
        assert map_shape(ours) == map_shape(general)
    assert abs(ours.stat().st_size - ref.stat().st_size) <= 8 * cs + (64 << 10)
    info = qemu_img("info", "--output=json", str(ours)).stdout
    assert info.replace(str(ours), "X") == qemu_img("info", "--output=json", str(ref)).stdout.replace(
        str(ref), "X").replace(str(ref.stat().st_size), str(ours.stat().st_size)).replace(
        f'"actual-size": {ref.stat().st_blocks * 512}', f'"actual-size": {ours.stat().st_blocks * 512}')


def test_all_zero_and_all_hole_sources(tmp_path: Path, taken: list[int]) -> None:
    for name, fill in (("holes.raw", False), ("zeros.raw", True)):
        src = tmp_path / name
        with open(src, "wb") as f:
            if fill:
                f.write(bytes(3 * MIB))
            else:
                f.truncate(3 * MIB)
        out = tmp_path / f"{name}.qcow2"
        convert(str(src), str(out), out_fmt="qcow2")
        assert_clean(out)
        qemu_compare(out, src)
        assert all(not e["data"] for e in __import__("json").loads(
            qemu_img("map", "--output=json", str(out)).stdout))
    assert taken == [1, 1]


def test_overwrites_an_existing_target(tmp_path: Path, taken: list[int]) -> None:
    src = tmp_path / "src.raw"
    _source(src, 2 * MIB, seed=5)
    out = tmp_path / "out.qcow2"
    out.write_bytes(os.urandom(5 * MIB))
    convert(str(src), str(out), out_fmt="qcow2")
    assert_clean(out)
    qemu_compare(out, src)
    assert taken == [1]


@pytest.mark.parametrize(
    "options",
    [
        {}, {"cluster_size": 512}, {"cluster_size": 4096, "refcount_bits": 64},
        {"cluster_size": 2 << 20, "compression_type": "zstd"}, {"lazy_refcounts": True},
    ],
)
def test_header_is_the_one_create_makes(tmp_path: Path, options: dict[str, Any]) -> None:
    size = 100 * MIB
    path = tmp_path / "made.qcow2"
    create(path, size, **options)
    made = Header.from_bytes(path.read_bytes()[:65536])
    cs = options.get("cluster_size", 65536)
    order = options.get("refcount_bits", 16).bit_length() - 1
    layout = rawpump.plan_layout(size, cs.bit_length() - 1, order, [(0, size)])
    ours = planned.fresh_header(layout, options)
    assert ours == made.replace(
        l1_table_offset=ours.l1_table_offset,
        refcount_table_clusters=ours.refcount_table_clusters,
    )


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


@pytest.mark.parametrize("where", ["read", "write"])
def test_error_in_the_middle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """An unreadable source or a full disk after a few chunks: the OSError itself, both
    threads gone, the target removed, the GIL switch interval restored."""
    monkeypatch.setattr(rawpump, "PUMP_CHUNK_BYTES", 256 << 10)
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(4 * MIB))
    calls = []
    name = "read_at" if where == "read" else "write_at"
    real = getattr(rawpump, name)
    err = errno.EIO if where == "read" else errno.ENOSPC

    def failing(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError(err, os.strerror(err))
        real(*args)

    monkeypatch.setattr(rawpump, name, failing)
    before = _threads()
    interval = sys.getswitchinterval()
    out = tmp_path / "out.qcow2"
    with pytest.raises(OSError) as info:
        convert(str(src), str(out), out_fmt="qcow2")
    assert info.value.errno == err
    assert _threads() == before
    assert sys.getswitchinterval() == interval
    assert not out.exists()


def test_cli_full_disk_is_a_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(rawpump, "PUMP_CHUNK_BYTES", 256 << 10)
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(2 * MIB))

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rawpump, "write_at", full)
    before = _threads()
    out = tmp_path / "out.qcow2"
    assert main(["convert", "-q", "-f", "raw", "-O", "qcow2", str(src), str(out)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err
    assert "Traceback" not in err
    assert _threads() == before
    assert not out.exists()


def test_abort_stops_a_running_pump(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """abort() (what an interrupt of the waiting thread runs) ends both threads even while
    the writer is blocked."""
    monkeypatch.setattr(rawpump, "PUMP_CHUNK_BYTES", 64 << 10)
    gate = threading.Event()
    real = rawpump.write_at

    def slow(*args: Any) -> None:
        gate.wait(10)
        real(*args)

    monkeypatch.setattr(rawpump, "write_at", slow)
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(2 * MIB))
    before = _threads()
    source = rawpump.FileStorage(str(src))
    target = rawpump.FileStorage(str(tmp_path / "out"), True, create=True)
    layout = rawpump.plan_layout(2 * MIB, 16, 4, [(0, 2 * MIB)])
    pump = rawpump.RawPump(source, target, [(0, 0, 2 * MIB)], block=65536, sparse=True,
                           layout=layout).start()
    threading.Timer(0.05, gate.set).start()
    pump.abort()
    gate.set()
    source.close()
    target.close()
    for t in _threads() - before:
        t.join(10)  # the timer
    assert _threads() == before


@pytest.mark.parametrize("block", [512, 4096, 65536])
def test_data_pieces_is_the_blockwise_answer(block: int) -> None:
    """data_pieces against a block-by-block reference, on zero runs of every size and
    alignment (runs just under a block, across blocks, at both ends, a short last block)."""
    rng = random.Random(block)
    for _ in range(150):
        n = rng.choice([block * rng.randint(1, 40), block * rng.randint(1, 40) - 512])
        n = max(n, 512)
        buf = bytearray(rng.randbytes(n))
        for _ in range(rng.randint(0, 12)):
            a = rng.randrange(n)
            length = rng.choice([1, block - 1, block, block + 1, 3 * block, rng.randrange(n)])
            buf[a : a + length] = bytes(len(buf[a : a + length]))
        expected: list[tuple[int, int]] = []
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            if any(buf[lo:hi]):
                if expected and expected[-1][1] == lo:
                    expected[-1] = (expected[-1][0], hi)
                else:
                    expected.append((lo, hi))
        got = rawpump.data_pieces(buf, n, block, bytes(min(block, 4096)), bytes(n))
        assert got == expected


def _holes(path: Path) -> list[tuple[int, int]]:
    """The data extents of a file by SEEK_DATA / SEEK_HOLE."""
    out = []
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                a = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            b = os.lseek(fd, a, os.SEEK_HOLE)
            out.append((a, b))
            pos = b
    return out


@pytest.fixture
def taken_raw(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the qcow2 -> raw converts that went the early way."""
    import qcow2kit.ops.convert as package

    calls: list[int] = []
    real = package.finish_raw

    def spy(early: Any) -> None:
        calls.append(1)
        real(early)

    monkeypatch.setattr(package, "finish_raw", spy)
    return calls


@pytest.mark.parametrize("cluster", ["512", "4k", "64k", "2M"])
def test_plain_qcow2_to_raw_matches_qemu(tmp_path: Path, taken_raw: list[int], cluster: str) -> None:
    src_raw = tmp_path / "src.raw"
    _source(src_raw, 7 * MIB + 512, seed=len(cluster))
    img = tmp_path / "src.qcow2"
    # -S 0: qemu writes zero blocks as data clusters, which the copy must leave as holes
    qemu_img("convert", "-S", "0", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cluster}",
             str(src_raw), str(img))
    ours = tmp_path / "ours.raw"
    convert(str(img), str(ours), out_fmt="raw")
    assert taken_raw == [1]
    assert ours.read_bytes() == src_raw.read_bytes()
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(img), str(ref))
    assert _holes(ours) == _holes(ref)


def _zeroed_qcow2(path: Path, cluster: str, *opts: str) -> None:
    """Patterns, then allocated zero clusters (write -z over data, no unmap: the stale
    pattern stays in the host clusters), plain zero clusters (write -z -u, and write -z over
    nothing) at odd places."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", ",".join((f"cluster_size={cluster}", *opts)),
             str(path), "11M")
    from tests.helpers import qemu_io

    qemu_io(path, "write -q -P 0xab 0 3M", "write -q -P 0xcd 4M 2M", "write -q -z 64k 192k",
            "write -q -z 1M 1M", "write -q -z -u 2560k 256k", "write -q -z 4608k 64k",
            "write -q -z -u 6M 512k", "write -q -z 3M 512k", "write -q -P 0x11 8M 3M",
            "write -q -z 8M 2M")


@pytest.mark.parametrize(("cluster", "opts"), [
    ("512", ()), ("4k", ()), ("64k", ()), ("2M", ()),
    ("64k", ("preallocation=falloc",)),
])
def test_qcow2_with_zero_clusters_to_raw_matches_qemu(
    tmp_path: Path, taken_raw: list[int], cluster: str, opts: tuple[str, ...]
) -> None:
    """Zero clusters, allocated or not, are holes in the output where qemu-img's are, and
    never their host clusters' stale bytes."""
    from qcow2kit.ops.map_plain import ZERO, plain_map

    img = tmp_path / "src.qcow2"
    _zeroed_qcow2(img, cluster, *opts)
    extents = plain_map(str(img))
    assert not isinstance(extents, str), extents
    zero_hosts = [o for c, o in zip(extents.codes, extents.offsets, strict=True) if c == ZERO]
    assert any(o >= 0 for o in zero_hosts), "no allocated zero cluster to test with"
    ours = tmp_path / "ours.raw"
    convert(str(img), str(ours), out_fmt="raw")
    assert taken_raw == [1]
    qemu_compare(img, ours)
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(img), str(ref))
    assert ours.read_bytes() == ref.read_bytes()
    assert _holes(ours) == _holes(ref)


@pytest.mark.parametrize("prealloc", ["metadata", "falloc"])
def test_preallocated_qcow2_zeroed_to_raw(tmp_path: Path, taken_raw: list[int],
                                          prealloc: str) -> None:
    """A preallocated image whose clusters were all zeroed (allocated zero clusters, the
    host file's content left as it was): an all-hole raw file."""
    img = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"preallocation={prealloc}", str(img), "4M")
    from tests.helpers import qemu_io

    qemu_io(img, "write -q -P 0x5a 0 4M", "write -q -z 0 4M")
    ours = tmp_path / "ours.raw"
    convert(str(img), str(ours), out_fmt="raw")
    assert taken_raw == [1]
    qemu_compare(img, ours)
    assert ours.read_bytes() == bytes(4 * MIB)
    assert _holes(ours) == []


def test_stale_bytes_of_allocated_zero_clusters_are_never_copied(
    tmp_path: Path, taken_raw: list[int]
) -> None:
    """A pattern, then write -z without unmap over it: the host clusters still hold the
    pattern (checked in the file), the guest reads zeros, and so does the output."""
    img = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "2M")
    from tests.helpers import qemu_io

    qemu_io(img, "write -q -P 0xee 0 2M", "write -q -z 0 1M", "write -q -z 1536k 64k")
    assert (b"\xee" * 65536) * 16 in img.read_bytes()  # the stale pattern is still there
    ours = tmp_path / "ours.raw"
    convert(str(img), str(ours), out_fmt="raw")
    assert taken_raw == [1]
    expected = bytes(MIB) + b"\xee" * (512 << 10) + bytes(64 << 10) + b"\xee" * (448 << 10)
    assert ours.read_bytes() == expected
    qemu_compare(img, ours)


def test_qcow2_sources_that_are_not_plain_take_the_general_path(
    tmp_path: Path, taken_raw: list[int]
) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "4M")
    from tests.helpers import qemu_io

    qemu_io(base, "write -P 1 0 1M", "write -c -P 2 1M 64k", "write -z 2M 64k")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(top))
    qemu_io(top, "write -P 3 512k 64k")
    for img in (base, top):
        out = tmp_path / f"{img.name}.raw"
        convert(str(img), str(out), out_fmt="raw")
        qemu_compare(img, out)
    assert taken_raw == []


def test_raw_output_error_in_the_middle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rawpump, "PUMP_CHUNK_BYTES", 256 << 10)
    img = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), "4M")
    from tests.helpers import qemu_io

    qemu_io(img, "write -P 7 0 4M")
    calls: list[int] = []
    real = rawpump.write_at

    def failing(*args: Any) -> None:
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(*args)

    monkeypatch.setattr(rawpump, "write_at", failing)
    before = _threads()
    out = tmp_path / "out.raw"
    with pytest.raises(OSError) as info:
        convert(str(img), str(out), out_fmt="raw")
    assert info.value.errno == errno.ENOSPC
    assert _threads() == before
    assert not out.exists()


def test_a_crash_before_the_header_leaves_no_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planned image's header is its last write and nothing before it touches cluster 0:
    a convert that dies at any earlier write leaves a file qemu-img does not take for a qcow2
    image (never a half-made one that looks valid). The writes are recorded and the file as
    it stood just before the header write is rebuilt and shown to qemu-img."""
    from qcow2kit.io.file import FileStorage

    src, dst = tmp_path / "src.raw", tmp_path / "dst.qcow2"
    _source(src, 3 << 20, seed=7)
    writes: list[tuple[int, bytes]] = []
    real_pwritev, real_pwrite = os.pwritev, FileStorage.pwrite
    target_fds: set[int] = set()

    def pwritev(fd: int, buffers: Any, offset: int) -> int:
        if fd in target_fds:
            writes.append((offset, b"".join(bytes(b) for b in buffers)))
        return real_pwritev(fd, buffers, offset)

    def pwrite(self: FileStorage, offset: int, data: Any) -> None:
        if self.name == str(dst):
            target_fds.add(self.fd)
            writes.append((offset, bytes(data)))
        real_pwrite(self, offset, data)

    real_init = FileStorage.__init__

    def init(self: FileStorage, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        if self.name == str(dst):
            target_fds.add(self.fd)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(FileStorage, "pwrite", pwrite)
    monkeypatch.setattr(FileStorage, "__init__", init)
    assert main(["convert", "-f", "raw", "-O", "qcow2", str(src), str(dst)]) == 0
    qemu_compare(dst, src)
    assert writes and writes[-1][0] == 0, "the header is not the last write"
    cluster = 65536
    assert all(offset >= cluster for offset, _ in writes[:-1]), "cluster 0 written before the header"
    crashed = tmp_path / "crashed.qcow2"
    with open(crashed, "wb") as f:
        for offset, data in writes[:-1]:
            f.seek(offset)
            f.write(data)
    info = qemu_img("info", "--output=json", str(crashed)).stdout
    assert '"format": "raw"' in info
