"""`map`'s numpy-free fast path (ops/map_plain.py, issue 16) against the full path
(ops/map.py) and qemu-img:

- on plain images of every cluster size and shape it answers, with exactly the text of the
  full path and of `qemu-img map` (JSON and human), also when every L2 table is its own batch
  or runs are cut into chunks of 3 entries (the joins between batches and chunks), and for
  ranges (--start-offset, --max-length) around clusters, tables and the end of the disk;
  among them zero clusters: plain (no host cluster) and allocated (a host cluster whose offset
  qemu-img prints), with and without the unmap that punches holes in the host file (where
  ops/map.py's metadata-preallocation heuristic must be computed), mixed with data at every
  cluster size, whole L2 tables of them, and preallocated images;
- on everything it does not handle it declines (and says why), and the command still prints
  the full path's answer;
- the command really takes it: no numpy, no argparse in the process;
- a locked image gives the same lock error, and -U the same output, with and without it;
- hostile images give the same output, errors and exit codes with and without it, never a
  traceback.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qcow2kit.cli import map as cli_map
from qcow2kit.cli.main import build_parser, main
from qcow2kit.ops import map_plain
from qcow2kit.ops.map import format_human, format_json, map_path_extents
from tests.helpers import layout, qemu_img, qemu_io, wait_for_lock

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30

Maker = Callable[[Path], Path]


def _create(p: Path, size: str, *opts: str) -> Path:
    args = ["create", "-q", "-f", "qcow2"]
    for o in opts:
        args += ["-o", o]
    qemu_img(*args, str(p), size)
    return p


def _written(size: str, cluster: str, *cmds: str, opts: tuple[str, ...] = ()) -> Maker:
    def make(p: Path) -> Path:
        _create(p, size, f"cluster_size={cluster}", *opts)
        if cmds:
            qemu_io(p, *cmds)
        return p
    return make


def _reverse(p: Path) -> Path:
    """4 KiB clusters written in 64 KiB chunks from the end (bench/compare.py's map-reverse4k,
    small): every chunk its own extent."""
    _create(p, "4M", "cluster_size=4k")
    qemu_io(p, *(f"write -q -P {i % 250 + 1} {off} 64k"
                 for i, off in enumerate(range(4 * MIB - 64 * KIB, -1, -64 * KIB))))
    return p


def _fragmented(cluster: str) -> Maker:
    def make(p: Path) -> Path:
        _create(p, "3M", f"cluster_size={cluster}")
        chunks = list(range(0, 3 * MIB, 16 * KIB))
        random.Random(16).shuffle(chunks)
        qemu_io(p, *(f"write -q -P {i % 250 + 1} {off} {16 * KIB}"
                     for i, off in enumerate(chunks[: len(chunks) * 2 // 3])))
        return p
    return make


def _unaligned_size(cut: int) -> Maker:
    """A virtual size that ends inside a cluster (the header is patched: qemu-img create
    rounds to 512): the last extent is cut."""
    def make(p: Path) -> Path:
        _create(p, "1M", "cluster_size=64k")
        qemu_io(p, "write -q -P 7 960k 64k", "write -q 0 4k")
        _patch_u64(p, 24, 1 * MIB - cut)
        return p
    return make


def _copied_cleared(p: Path) -> Path:
    """Data clusters without the COPIED flag (as if shared with a snapshot once): a check
    error, but map reads them as any data cluster."""
    _create(p, "8M", "cluster_size=4k")
    qemu_io(p, "write -q 0 1M", "write -q 4M 64k")
    table = layout(p)["l1"][0] & 0x00FFFFFFFFFFFE00
    for index in (3, 4, 200, 1024):
        _patch_u64(p, table + 8 * index, _u64(p, table + 8 * index) & ~COPIED)
    return p


def _zero_mixed(cluster: str, size: int) -> Maker:
    """Data, allocated zero clusters (write -z over data), plain zero clusters (write -z -u
    over data, and over nothing), at odd places in an image of `size` bytes."""
    def make(p: Path) -> Path:
        _create(p, str(size), f"cluster_size={cluster}")
        chunks = list(range(0, size, 16 * KIB))
        rng = random.Random(size + len(cluster))
        rng.shuffle(chunks)
        cmds = [f"write -q -P {i % 250 + 1} {off} {16 * KIB}"
                for i, off in enumerate(chunks[: len(chunks) * 3 // 4])]
        for i, off in enumerate(chunks[: len(chunks) // 2]):
            length = rng.choice([16 * KIB, 48 * KIB, 160 * KIB])
            if off + length <= size:
                cmds.append(f"write -q -z{' -u' if i % 3 == 0 else ''} {off} {length}")
        qemu_io(p, *cmds)
        return p
    return make


def _prealloc_zeroed(prealloc: str, *cmds: str) -> Maker:
    """A preallocated image, then `cmds`: data clusters turned into allocated zero ones."""
    return _written("8M", "64k", *cmds, opts=(f"preallocation={prealloc}",))


def _v2(p: Path) -> Path:
    _create(p, "64M", "compat=0.10")
    qemu_io(p, "write -q 1M 3M", "write -q 40M 64k")
    return p


def _backing(p: Path) -> Path:
    base = p.with_name(p.name + ".base")
    _create(base, "64M")
    qemu_io(base, "write -q 0 8M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", str(p))
    qemu_io(p, "write -q 4M 1M")
    return p


def _data_file(p: Path) -> Path:
    _create(p, "16M", f"data_file={p}.data")  # (a relative name is made in the cwd)
    qemu_io(p, "write -q 0 1M")
    return p


def _snapshot(p: Path) -> Path:
    _create(p, "16M")
    qemu_io(p, "write -q 0 1M")
    qemu_img("snapshot", "-c", "s1", str(p))
    return p


def _bitmap(p: Path) -> Path:
    _create(p, "16M")
    qemu_io(p, "write -q 0 1M")
    qemu_img("bitmap", "--add", str(p), "b0")
    return p


def _raw(p: Path) -> Path:
    with open(p, "wb") as f:
        f.truncate(4 * MIB)
        f.write(b"x" * 4096)
    return p


# name -> (maker, None if the fast path answers, else a word of its reason)
PLAIN: dict[str, Maker] = {
    "empty": _written("64M", "64k"),
    "zero-size": _written("0", "64k"),
    "dense": _written("8M", "64k", "write -q -P 1 0 8M"),
    "sparse": _written("1G", "64k", "write -q 0 64k", "write -q 300M 1M", "write -q 1023M 1M"),
    "reverse-4k": _reverse,
    "fragmented-512": _fragmented("512"),
    "fragmented-4k": _fragmented("4k"),
    "fragmented-64k": _fragmented("64k"),
    "clusters-2m": _written("64M", "2M", "write -q 0 5M", "write -q 33M 2M"),
    "clusters-512-many-tables": _written("40M", "512", "write -q 0 20M", "write -q 30M 4k"),
    "unaligned-size": _unaligned_size(1536),
    "odd-size": _unaligned_size(1000),
    "l1-holes": _written("2G", "64k", "write -q 0 64k", "write -q 1536M 1M"),
    "l1-holes-512": _written("1M", "512", "write -q 0 4k", "write -q 100k 4k",
                             "write -q 1020k 4k"),
    "huge-sparse-1t": _written("1T", "64k", "write -q 0 4M", "write -q 512G 1M",
                               "write -q 1023G 4M"),
    "falloc": _written("8M", "64k", opts=("preallocation=falloc",)),
    "v2": _v2,
    "copied-cleared": _copied_cleared,
    "backing": _backing,  # through the chain (tests/cli/test_map_fast_chain.py)
    # zero clusters
    "zero-plain-1t": _written("1T", "64k", "write -q -z 800G 1G"),  # whole L2 tables of them
    "zero-alloc": _written("8M", "64k", "write -q -P 5 0 2M", "write -q -z 256k 128k",
                           "write -q -z 1M 1M"),
    "zero-unmapped": _written("16M", "64k", "write -q -P 3 0 8M", "write -q -z -u 1M 2M",
                              "write -q -z 4M 1M", "write -q -z 12M 64k"),
    "zero-whole-table-512": _written("1M", "512", "write -q -P 1 0 256k",
                                     "write -q -z 32k 32k", "write -q -z -u 96k 32k",
                                     "write -q -z 512k 64k"),
    "zero-whole-table-64k": _written("1G", "64k", "write -q -P 1 500M 24M",
                                     "write -q -z 0 512M", "write -q -z -u 520M 2M"),
    "zero-mixed-512": _zero_mixed("512", 2 * MIB),
    "zero-mixed-4k": _zero_mixed("4k", 3 * MIB),
    "zero-mixed-64k": _zero_mixed("64k", 6 * MIB),
    "zero-mixed-2m": _zero_mixed("2M", 24 * MIB),
    "metadata-prealloc-zeroed": _prealloc_zeroed("metadata", "write -q -z 0 8M"),
    "metadata-prealloc-unmapped": _prealloc_zeroed("metadata", "write -q -z -u 0 8M"),
    "falloc-zeroed": _prealloc_zeroed("falloc", "write -q -P 9 1M 1M", "write -q -z 0 1536k",
                                      "write -q -z -u 6M 1M"),
}
# qemu counts the disk in whole 512-byte sectors; ops/map.py (and so the fast path) maps the
# header's size exactly
QEMU_ROUNDS_SIZE = {"odd-size"}
FALLBACK: dict[str, tuple[Maker, str]] = {
    "compressed": (_written("8M", "64k", "write -q -c 0 128k", "write -q 1M 64k"), "compressed"),
    # the human table stops at the first compressed extent, data after it is not listed
    "compressed-between-data": (_written("8M", "64k", "write -q 0 64k", "write -q -c 1M 64k",
                                         "write -q 2M 64k", "write -q -c 3M 64k"), "compressed"),
    # data clusters among the allocated zero ones of a sparse host file that looks
    # preallocated: ops/map.py splits them by the file's holes
    "metadata-prealloc-part-zeroed": (_prealloc_zeroed("metadata", "write -q -z 1M 2M"),
                                      "sparse"),
    "extended-l2": (_written("8M", "64k", "write -q 0 1M", opts=("extended_l2=on",)),
                    "extended"),
    "data-file": (_data_file, "data file"),
    "snapshot": (_snapshot, "snapshot"),
    "bitmap": (_bitmap, "bitmap"),
    "raw": (_raw, "qcow2"),
    "metadata-prealloc": (_written("8M", "64k", opts=("preallocation=metadata",)), "sparse"),
    "missing": (lambda p: p, "cannot open"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    root = tmp_path_factory.mktemp("map_fast")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            maker = PLAIN[name] if name in PLAIN else FALLBACK[name][0]
            built[name] = maker(root / f"{name}.qcow2")
        return built[name]
    yield get


def _full(path: Path, backing: bool = True) -> tuple[str, tuple[str, str | None]]:
    ext = map_path_extents(str(path), backing=backing)
    return format_json(ext), format_human(ext)


def _fast(path: Path, backing: bool = True) -> tuple[str, tuple[str, str | None]]:
    found = map_plain.plain_map(str(path), backing=backing)
    assert not isinstance(found, str), f"fell back: {found}"
    return found.json(), found.human()


@pytest.mark.parametrize("name", PLAIN)
@pytest.mark.parametrize("batch", ["default", "one-table", "tiny-chunks"])
def test_plain_images_same_as_full_path_and_qemu(images: Callable[[str], Path], name: str,
                                                 batch: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = images(name)
    if batch == "one-table":
        monkeypatch.setattr(map_plain, "_BATCH_ENTRIES", 1)  # every L2 table its own batch
    if batch == "tiny-chunks":
        monkeypatch.setattr(map_plain, "_CHUNK_ENTRIES", 3)  # runs split across chunks
    fast_json, fast_human = _fast(path)
    full_json, full_human = _full(path)
    assert fast_json == full_json
    assert fast_human == full_human
    if name in QEMU_ROUNDS_SIZE:
        return
    assert fast_json == qemu_img("map", "--output=json", str(path)).stdout
    assert fast_human == (qemu_img("map", str(path)).stdout, None)


@pytest.mark.parametrize("name", FALLBACK)
def test_declines_what_it_does_not_handle(images: Callable[[str], Path], name: str) -> None:
    reason = map_plain.plain_map(str(images(name)))
    assert isinstance(reason, str)
    assert FALLBACK[name][1] in reason


def test_declines_zero_clusters_of_a_version_2_image(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """qemu refuses the zero flag in a version 2 image ("Zero cluster entry found in pre-v3
    image"): the fast path leaves such an entry to the full path, which refuses it too."""
    path = _v2(tmp_path / "v2.qcow2")
    table = layout(path)["l1"][0] & 0x00FFFFFFFFFFFE00
    _patch_u64(path, table + 8 * 20, _u64(path, table + 8 * 20) | 1)
    reason = map_plain.plain_map(str(path))
    assert isinstance(reason, str) and "version 2" in reason
    rc, out, err = _run(["map", "--output=json", str(path)], capsys)
    assert (rc, out) == (1, "") and "Zero cluster entry found in pre-v3 image" in err


def test_no_backing_is_plain(images: Callable[[str], Path]) -> None:
    path = images("backing")
    assert _fast(path, backing=False) == _full(path, backing=False)


@pytest.mark.parametrize("name", [n for n in FALLBACK if n != "missing"])
def test_command_falls_back_to_the_same_answer_as_qemu(images: Callable[[str], Path],
                                                      name: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = str(images(name))
    for extra in (["--output=json"], []):
        rc = main(["map", *extra, path])
        out, err = capsys.readouterr()
        ref = qemu_img("map", *extra, path, check=False)
        assert out == ref.stdout
        assert rc == (0 if ref.returncode == 0 else 1)
        if ref.returncode:
            assert "compressed clusters" in err and "compressed clusters" in ref.stderr


_PROBE = (
    "import sys\n"
    "from qcow2kit.cli.main import main\n"
    "rc = main(sys.argv[1:])\n"
    "sys.stdout.flush()\n"
    "print('numpy' in sys.modules, 'argparse' in sys.modules, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def _probe(*argv: str) -> tuple[str, bool, bool]:
    res = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    numpy, argparse = res.stderr.split()
    return res.stdout, numpy == "True", argparse == "True"


@pytest.mark.parametrize("output", [["--output=json"], ["--output", "human"], []])
def test_command_takes_the_fast_path(images: Callable[[str], Path], output: list[str]) -> None:
    path = str(images("sparse"))
    out, numpy, argparse = _probe("map", *output, path)
    assert not numpy and not argparse
    assert out == qemu_img("map", *output, path).stdout


def test_command_falls_back_with_numpy(images: Callable[[str], Path]) -> None:
    path = str(images("compressed"))
    out, numpy, _ = _probe("map", "--output=json", path)
    assert numpy
    assert out == qemu_img("map", "--output=json", path).stdout


def test_offsets_take_the_fast_path(images: Callable[[str], Path]) -> None:
    path = str(images("sparse"))
    argv = ["--output=json", "--start-offset=300M", "--max-length", "1000k"]
    out, numpy, _ = _probe("map", *argv, path)
    assert not numpy
    assert out == qemu_img("map", *argv, path).stdout


def _ranges(size: int) -> list[tuple[int, int | None]]:
    """Ranges around clusters of every size, L2 tables, the middle and the end of the disk."""
    ranges: list[tuple[int, int | None]] = [
        (0, 0), (1, None), (511, 1000), (4095, 8193), (65535, 65537), (100_000, 3_000_000),
        (size // 2 + 777, None), (size // 3, size // 3), (size - 1, None), (size, None),
        (size + 4096, 100), (12345, 0)]
    return [(start, length) for start, length in ranges if start >= 0]


@pytest.mark.parametrize("name", PLAIN)
def test_ranges_same_as_full_path_and_qemu(images: Callable[[str], Path], name: str) -> None:
    path = images(name)
    size = int(layout(path)["size"])
    for start, length in _ranges(size):
        found = map_plain.plain_map(str(path), start=start, length=length)
        assert not isinstance(found, str), found
        full = map_path_extents(str(path), start=start, length=length)
        assert found.json() == format_json(full), (start, length)
        assert found.human() == format_human(full), (start, length)
        if name in QEMU_ROUNDS_SIZE:
            continue
        extra = ["--start-offset", str(start)]
        if length is not None:
            extra += ["--max-length", str(length)]
        assert found.json() == qemu_img("map", "--output=json", *extra, str(path)).stdout, \
            (start, length)


# ranges whose ends cut zero extents: inside an allocated zero cluster (its offset moves with
# the start), inside plain ones, across the borders of zero and data extents
ZERO_RANGES: dict[str, list[tuple[int, int | None]]] = {
    "zero-alloc": [(256 * KIB + 1000, 100 * KIB), (300 * KIB, None), (1 * MIB + 12345, 5000),
                   (200 * KIB, 3 * MIB), (2 * MIB - 1, 2)],
    "zero-unmapped": [(1 * MIB + 777, 2 * MIB), (4 * MIB + 65536 + 3, 10), (3 * MIB - 5, 10),
                      (12 * MIB + 1, 65535)],
    "zero-plain-1t": [(800 * GIB + 1, 512 * MIB), (800 * GIB - 5, 10), (801 * GIB - 1, None)],
    "metadata-prealloc-zeroed": [(65537, 3 * 65536), (0, 1)],
    "falloc-zeroed": [(1536 * KIB - 1, 2), (1 * MIB + 3, 600 * KIB), (6 * MIB + 9, 2 * MIB)],
}


@pytest.mark.parametrize("name", ZERO_RANGES)
def test_ranges_cutting_zero_extents(images: Callable[[str], Path], name: str) -> None:
    path = images(name)
    for start, length in ZERO_RANGES[name]:
        found = map_plain.plain_map(str(path), start=start, length=length)
        assert not isinstance(found, str), found
        assert map_plain.ZERO in found.codes, (start, length)  # a zero extent is cut
        full = map_path_extents(str(path), start=start, length=length)
        assert found.json() == format_json(full), (start, length)
        assert found.human() == format_human(full), (start, length)
        extra = ["--start-offset", str(start)]
        if length is not None:
            extra += ["--max-length", str(length)]
        assert found.json() == qemu_img("map", "--output=json", *extra, str(path)).stdout, \
            (start, length)
        assert found.human() == (qemu_img("map", *extra, str(path)).stdout, None)


@pytest.mark.parametrize("name", ["zero-unmapped", "zero-mixed-4k", "metadata-prealloc-zeroed"])
def test_command_takes_the_fast_path_with_zero_clusters(images: Callable[[str], Path],
                                                        name: str) -> None:
    path = str(images(name))
    for output in (["--output=json"], []):
        out, numpy, _ = _probe("map", *output, path)
        assert not numpy
        assert out == qemu_img("map", *output, path).stdout


# images with data whose host file has holes, so that whether ops/map.py's (and qemu's)
# metadata-preallocation heuristic holds needs the refcounts: the fast path computes it itself
SPARSE_HOSTS = ["zero-unmapped", "metadata-prealloc-part-zeroed", "metadata-prealloc"]


@pytest.mark.parametrize("name", SPARSE_HOSTS)
def test_preallocation_heuristic_same_as_qemu(images: Callable[[str], Path], name: str) -> None:
    from qcow2kit.io.file import FileStorage
    from qcow2kit.metadata.header_io import read_header
    from tests.helpers import qemu_map

    path = str(images(name))
    storage = FileStorage(path, False)
    try:
        header = read_header(storage)
        size = storage.size()
        assert map_plain.may_look_preallocated(storage, header.cluster_size, size)
        holds = map_plain.looks_preallocated(storage, header, size)
    finally:
        storage.close()
    # where it holds, qemu splits data clusters by the host file's holes: zero and data
    assert holds == any(e["zero"] and e["data"] for e in qemu_map(path))
    assert holds == (name != "zero-unmapped")
    assert isinstance(map_plain.plain_map(path), str) == holds


# ---- argument parsing without argparse ------------------------------------------------------
ACCEPTED = [
    ["x.qcow2"],
    ["--output=json", "x.qcow2"],
    ["--output", "human", "-U", "x.qcow2"],
    ["x.qcow2", "--force-share", "-f", "qcow2", "--no-backing"],
    ["-f", "raw", "--start-offset", "1M", "--max-length=2k", "x"],
    ["--start-offset=0x10", "--max-length", "5", "x", "--output=human", "--output=json"],
    ["--start-offset=", "x"],
]
DECLINED = [
    [], ["-h"], ["--help", "x"], ["--out=json", "x"], ["-f", "vmdk", "x"], ["-fqcow2", "x"],
    ["--start-offset", "-1", "x"], ["--start-offset=-1", "x"], ["--start", "1", "x"],
    ["--max-length"], ["a", "b"], ["--", "x"], ["-"], ["--no-backing"],
]


@pytest.mark.parametrize("rest", ACCEPTED, ids=" ".join)
def test_fast_args_same_as_argparse(rest: list[str]) -> None:
    fast = cli_map.fast_args(rest)
    assert fast is not None
    assert vars(fast) == vars(build_parser(["map"]).parse_args(["map", *rest]))


@pytest.mark.parametrize("rest", DECLINED, ids=" ".join)
def test_fast_args_declines(rest: list[str]) -> None:
    assert cli_map.fast_args(rest) is None


# ---- hostile images: the same answer with and without the fast path -------------------------
def _patch_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def _u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


def _l2_entry(path: Path, index: int) -> int:
    """The file offset of L2 entry `index` of the first L2 table."""
    return (layout(path)["l1"][0] & 0x00FFFFFFFFFFFE00) + 8 * index


def _hostile_base(p: Path) -> Path:
    # the disk ends inside the first L2 table: entries past it are never looked at
    _create(p, "100M", "cluster_size=64k")
    qemu_io(p, "write -q 0 256k", "write -q 50M 64k")
    return p


def _set_l1(value: Callable[[int], int]) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        off = layout(p)["l1_offset"]
        _patch_u64(p, off, value(_u64(p, off)))
    return patch


def _set_l2(index: int, value: Callable[[int], int]) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        off = _l2_entry(p, index)
        _patch_u64(p, off, value(_u64(p, off)))
    return patch


def _set_reftable(value: Callable[[int], int]) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        off = layout(p)["reftable_offset"]
        _patch_u64(p, off, value(_u64(p, off)))
    return patch


def _set_header(offset: int, value: int) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        _patch_u64(p, offset, value)
    return patch


def _set_u32(offset: int, value: int) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        with open(p, "r+b") as f:
            f.seek(offset)
            f.write(struct.pack(">I", value))
    return patch


def _truncate(p: Path) -> None:
    os.truncate(p, 100)


COPIED = 1 << 63


def _l1_to_itself(p: Path) -> None:
    """L1 entry 0 names the L1 table as its L2 table: its entries read as data clusters."""
    off = layout(p)["l1_offset"]
    _patch_u64(p, off, COPIED | off)


HOSTILE: dict[str, tuple[Callable[[Path], None], bool]] = {
    # name: (patch, whether the fast path still answers)
    "l1-past-eof": (_set_l1(lambda v: COPIED | 1 << 40), False),
    "l1-reserved-bit": (_set_l1(lambda v: v | 1), False),
    "l1-unaligned": (_set_l1(lambda v: v + 512), False),
    "l1-only-reserved-bits": (_set_l1(lambda v: 1 << 56), False),
    "l2-reserved-bit": (_set_l2(0, lambda v: v | 2), False),
    "l2-unaligned": (_set_l2(1, lambda v: v + 512), False),
    "l2-data-past-eof": (_set_l2(2, lambda v: COPIED | 1 << 40), False),
    "l2-compressed-past-the-disk": (_set_l2(8191, lambda v: 1 << 62 | 12345), True),
    "l2-zero-flag-on-data": (_set_l2(1, lambda v: v | 1), True),  # an allocated zero cluster
    "l2-plain-zero": (_set_l2(6, lambda v: 1), True),
    "l2-zero-with-copied-only": (_set_l2(7, lambda v: COPIED | 1), True),
    "l2-zero-unaligned": (_set_l2(1, lambda v: v + 512 | 1), False),
    "l2-zero-past-eof": (_set_l2(2, lambda v: COPIED | 1 << 40 | 1), False),
    "l2-zero-reserved-bit": (_set_l2(2, lambda v: v | 3), False),
    "l2-garbage-past-the-disk": (_set_l2(1700, lambda v: (1 << 64) - 1), True),
    "l1-points-at-itself": (_l1_to_itself, True),
    "reftable-reserved-bit": (_set_reftable(lambda v: v | 1), False),
    "reftable-unaligned": (_set_reftable(lambda v: v + 512), False),
    "reftable-past-eof": (_set_reftable(lambda v: 1 << 40), False),
    "huge-l1-size": (_set_u32(36, 0x7FFFFFFF), False),
    "l1-size-past-eof": (_set_u32(36, 1 << 20), False),
    "size-too-big": (_set_header(24, 1 << 62), False),
    "truncated": (_truncate, False),
}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _sparse_base(p: Path) -> Path:
    # data and a punched hole: the host file is sparse enough that the fast path reads the
    # refcounts for the metadata-preallocation heuristic (which does not hold here)
    _create(p, "16M", "cluster_size=64k")
    qemu_io(p, "write -q -P 3 0 8M", "write -q -z -u 1M 2M")
    return p


def _set_refblock(fill: bytes) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        block = _u64(p, layout(p)["reftable_offset"])
        with open(p, "r+b") as f:
            f.seek(block)
            f.write(fill * (65536 // len(fill)))
    return patch


SPARSE_HOSTILE: dict[str, tuple[Callable[[Path], None], bool]] = {
    "untouched": (lambda p: None, True),
    "reftable-reserved-bit": (_set_reftable(lambda v: v | 1), False),
    "reftable-past-eof": (_set_reftable(lambda v: 1 << 40), False),
    "refblock-past-eof": (_set_reftable(lambda v: 1 << 30), False),
    "refblock-all-set": (_set_refblock(b"\xff"), False),  # the heuristic holds now
    "refblock-all-zero": (_set_refblock(b"\0"), True),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_images_same_answer(tmp_path: Path, name: str,
                                    capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = _hostile_base(tmp_path / "h.qcow2")
    patch, fast_answers = HOSTILE[name]
    patch(path)
    _same_answer(path, fast_answers, capsys, monkeypatch)


@pytest.mark.parametrize("name", SPARSE_HOSTILE)
def test_hostile_sparse_images_same_answer(tmp_path: Path, name: str,
                                           capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = _sparse_base(tmp_path / "s.qcow2")
    patch, fast_answers = SPARSE_HOSTILE[name]
    patch(path)
    _same_answer(path, fast_answers, capsys, monkeypatch)


def _same_answer(path: Path, fast_answers: bool, capsys: pytest.CaptureFixture[str],
                 monkeypatch: pytest.MonkeyPatch) -> None:
    """map of `path` with and without the fast path: the same output, error and exit code;
    whether the fast path answered as expected; the image never written."""
    before = path.read_bytes()
    answers = []
    real = map_plain.plain_map

    def spy(*args: object, **kwargs: object) -> object:
        found = real(*args, **kwargs)  # type: ignore[arg-type]
        answers.append(found)
        return found

    monkeypatch.setattr(map_plain, "plain_map", spy)
    for extra in (["--output=json"], []):
        argv = ["map", *extra, str(path)]
        with_fast = _run(argv, capsys)
        assert (not isinstance(answers[-1], str)) == fast_answers, answers[-1]
        monkeypatch.setattr(map_plain, "plain_map", lambda *a, **k: "disabled by the test")
        without = _run(argv, capsys)
        monkeypatch.setattr(map_plain, "plain_map", spy)
        assert with_fast == without
        assert with_fast[0] in (0, 1) and "internal error" not in with_fast[2]
    assert path.read_bytes() == before  # never written


def test_errors_of_files_that_are_not_images(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    raw = _raw(tmp_path / "r.raw")
    cases = [["map", str(tmp_path / "missing")], ["map", "-f", "qcow2", str(raw)],
             ["map", "-f", "qcow2", str(empty)], ["map", str(tmp_path)]]
    for argv in cases:
        with_fast = _run(argv, capsys)
        monkeypatch.setattr(map_plain, "plain_map", lambda *a, **k: "disabled by the test")
        without = _run(argv, capsys)
        monkeypatch.undo()
        assert with_fast == without
        assert with_fast[0] == 1 and with_fast[2].startswith("qcow2kit: "), with_fast


# ---- the byte-column test of plain entries against the rule, entry by entry ----------------
OFFSET_MASK = 0x00FFFFFFFFFFFE00


@pytest.mark.parametrize("zero_flags", [False, True])
@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_plain_entries_is_the_rule(cluster_bits: int, zero_flags: bool) -> None:
    cs = 1 << cluster_bits
    allowed = COPIED | (OFFSET_MASK & ~(cs - 1)) | (1 if zero_flags else 0)
    r = random.Random(cluster_bits)
    entries = []
    for _ in range(3000):
        e = r.getrandbits(47) << cluster_bits & OFFSET_MASK | (COPIED if r.random() < 0.5 else 0)
        if r.random() < 0.3:
            e |= 1  # the zero flag
        if r.random() < 0.3:
            e ^= 1 << r.randrange(64)  # one bit anywhere: often one the rule forbids
        entries.append(e)
    for e in entries:
        assert map_plain.plain_entries(struct.pack(">Q", e), cs, zero_flags) == (
            e & ~allowed == 0), hex(e)
    good = [e for e in entries if e & ~allowed == 0]
    bad = [e for e in entries if e & ~allowed]
    assert map_plain.plain_entries(struct.pack(f">{len(good)}Q", *good), cs, zero_flags)
    for e in bad[:50]:
        mixed = good[:100] + [e] + good[100:200]
        assert not map_plain.plain_entries(struct.pack(f">{len(mixed)}Q", *mixed), cs,
                                           zero_flags)


# ---- locks: the fast path opens the image as the full path does ----------------------------
def test_locked_image(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    img = _written("16M", "64k", "write -q 0 1M")(tmp_path / "busy.qcow2")
    holder = subprocess.Popen(["qemu-io", str(img)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lock(img)
        locked = _run(["map", "--output=json", str(img)], capsys)
        assert locked[0] == 1 and 'Failed to get shared "write" lock' in locked[2], locked
        shared = _run(["map", "--output=json", "-U", str(img)], capsys)
        assert shared == (0, qemu_img("map", "--output=json", "-U", str(img)).stdout, "")
        assert not isinstance(map_plain.plain_map(str(img), force_share=True), str)
        monkeypatch.setattr(map_plain, "plain_map", lambda *a, **k: "disabled by the test")
        assert _run(["map", "--output=json", str(img)], capsys) == locked
        assert _run(["map", "--output=json", "-U", str(img)], capsys) == shared
    finally:
        holder.kill()
        holder.wait()
