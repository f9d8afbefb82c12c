"""The numpy-free fast path of `qcow2kit check` (ops/check_plain.py), differentially: on every
image, `qcow2kit check` (which takes the fast path when it can) prints exactly what the full
check prints and exits with the same code, and for clean images exactly what qemu-img prints.
The fast path really runs for plain clean images (numpy never imported) and declines, leaving
the words to the full check, for corrupt, leaky and unusual ones (numpy imported)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qcow2kit.ops.check import check_path, to_human, to_json
from qcow2kit.ops.check_plain import prove_clean
from tests.helpers import layout, pattern, qemu_img, qemu_io

# runs one command; reports on its last stderr line whether numpy was imported
_PROBE = (
    "import sys\n"
    "from qcow2kit.cli.main import main\n"
    "rc = main(sys.argv[1:])\n"
    "sys.stdout.flush()\n"
    "sys.stderr.write('\\nNUMPY=%d\\n' % ('numpy' in sys.modules))\n"
    "sys.exit(rc)\n"
)


def cli(*args: str) -> tuple[int, str, str, bool]:
    """(exit code, stdout, stderr, numpy imported) of `qcow2kit check ARGS` in a new process."""
    res = subprocess.run([sys.executable, "-c", _PROBE, "check", *args], capture_output=True,
                         text=True)
    err, _, flag = res.stderr.rstrip("\n").rpartition("\n")
    assert flag.startswith("NUMPY="), res.stderr
    return res.returncode, res.stdout, err.rstrip("\n"), flag == "NUMPY=1"


def full(path: Path, output: str) -> tuple[int, str]:
    """What the full check (never the fast path) prints on stdout, and its exit code."""
    result = check_path(str(path))
    text = to_json(result, str(path)) if output == "json" else to_human(result)
    rc = 1 if result.check_errors or result.error is not None else result.exit_code
    return rc, text


# ---- images ---------------------------------------------------------------------------------
def create(path: Path, size: str, *opts: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", ",".join(opts)] if opts else []), str(path), size)
    return path


def dense(path: Path, cluster: str, size: int) -> Path:
    raw = path.with_suffix(".raw")
    raw.write_bytes(pattern(size, size))
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cluster}", str(raw),
             str(path))
    raw.unlink()
    return path


def written(path: Path, size: str, cmds: list[str], *opts: str) -> Path:
    create(path, size, *opts)
    qemu_io(path, *cmds)
    return path


SCATTER = ["write -q -P 1 0 64k", "write -q -P 2 1M 3k", "write -q -P 3 7M 200k", "write -q -P 4 33M 1M",
           "write -q -P 5 63M 1M"]
# written backwards: every chunk lands before the previous one in the guest, after it on disk
REVERSE = [f"write -q -P {i + 1} {(15 - i) * 64}k 64k" for i in range(16)]

Maker = Callable[[Path], Path]

CLEAN: dict[str, Maker] = {
    "empty": lambda p: create(p, "64M"),
    "empty_zero_size": lambda p: create(p, "0"),
    "dense_512": lambda p: dense(p, "512", 2 << 20),
    "dense_4k": lambda p: dense(p, "4k", 8 << 20),
    "dense_64k": lambda p: dense(p, "64k", 8 << 20),
    "dense_2m": lambda p: dense(p, "2M", 8 << 20),
    "sparse": lambda p: written(p, "64M", SCATTER),
    "sparse_4k": lambda p: written(p, "64M", SCATTER, "cluster_size=4k"),
    "fragmented": lambda p: written(p, "1M", REVERSE, "cluster_size=4k"),
    "fragmented_512": lambda p: written(p, "1M", REVERSE, "cluster_size=512"),
    "refcount_8": lambda p: written(p, "64M", SCATTER, "refcount_bits=8"),
    "refcount_32": lambda p: written(p, "64M", SCATTER, "refcount_bits=32"),
    "refcount_64": lambda p: written(p, "64M", SCATTER, "refcount_bits=64", "cluster_size=4k"),
    "sparse_1t": lambda p: written(p, "1T", ["write -q -P 1 0 4M", "write -q -P 2 1023G 4M",
                                             "write -q -P 3 512G 1M"]),
    "l2_per_gib": lambda p: written(p, "64G", [f"write -q -P {i + 1} {i}G 64k" for i in range(64)]),
    "discarded": lambda p: written(p, "64M", ["write -q -P 1 0 8M", "discard -q 1M 2M",
                                              "discard -q 5M 64k", "write -q -P 2 2M 128k"]),
    "zero_clusters": lambda p: written(p, "64M", ["write -q -P 1 0 4M", "write -q -z 1M 1M",
                                                  "write -q -z -u 2M 1M", "write -q -z 32M 1M"]),
    "compat_0_10": lambda p: written(p, "64M", SCATTER, "compat=0.10"),
    "prealloc_metadata": lambda p: create(p, "16M", "preallocation=metadata"),
    "prealloc_full": lambda p: create(p, "4M", "preallocation=full", "cluster_size=4k"),
    "unaligned_size": lambda p: written(p, "10000001", ["write -q -P 1 9M 512"]),
}


def _overlay(p: Path) -> Path:
    base = written(p.with_name("base.qcow2"), "64M", ["write -q -P 9 0 8M"])
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(p))
    qemu_io(p, "write -q -P 1 1M 1M")
    return p


def _trailing_zeros(p: Path) -> Path:
    written(p, "64M", SCATTER)
    with open(p, "ab") as f:
        f.write(bytes(3 * 65536 + 100))  # clusters nothing references, refcount 0: clean
    return p


def _refcount_past_the_end(p: Path) -> Path:
    """A refcount of 1 for a cluster past the end of the file: qemu-img (and the full check)
    compare only the clusters of the file, so the image is clean."""
    written(p, "64M", SCATTER)
    lay = layout(p)
    _patch(p, _refcount_at(p, -(-lay["file_size"] // lay["cluster_size"]) + 3), (1).to_bytes(2, "big"))
    return p


def _dense_zero_alloc(p: Path) -> Path:
    """A whole L2 table of preallocated zero clusters (offset, COPIED and the zero flag)."""
    dense(p, "4k", 4 << 20)
    qemu_io(p, "write -q -z 0 2M")
    return p


CLEAN["backing_file"] = _overlay
CLEAN["dense_zero_alloc"] = _dense_zero_alloc
CLEAN["trailing_zeros"] = _trailing_zeros
CLEAN["refcount_past_the_end"] = _refcount_past_the_end

# clean, but with something the fast path leaves to the full check
UNUSUAL: dict[str, Maker] = {
    "refcount_1": lambda p: written(p, "64M", SCATTER, "refcount_bits=1"),
    "refcount_4": lambda p: written(p, "64M", SCATTER, "refcount_bits=4"),
    "lazy_refcounts": lambda p: written(p, "64M", SCATTER, "lazy_refcounts=on"),
    "extended_l2": lambda p: written(p, "64M", SCATTER, "extended_l2=on"),
}


def _snapshot(p: Path) -> Path:
    written(p, "64M", SCATTER)
    qemu_img("snapshot", "-c", "s1", str(p))
    qemu_io(p, "write -q -P 7 0 64k")
    return p


def _compressed(p: Path) -> Path:
    src = written(p.with_name("src.qcow2"), "8M", ["write -q -P 1 0 1M", "write -q -P 2 3M 64k"])
    qemu_img("convert", "-q", "-c", "-O", "qcow2", str(src), str(p))
    return p


def _bitmap(p: Path) -> Path:
    written(p, "64M", SCATTER)
    qemu_img("bitmap", "--add", str(p), "b0")
    return p


def _data_file(p: Path) -> Path:
    create(p, "16M", f"data_file={p.with_name('data.raw')}")
    qemu_io(p, "write -q -P 1 0 1M")
    return p


UNUSUAL.update(snapshot=_snapshot, compressed=_compressed, bitmap=_bitmap, data_file=_data_file)


# ---- hand-made damage -----------------------------------------------------------------------
def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int(struct.unpack(">Q", f.read(8))[0])


def _refcount_at(path: Path, cluster: int) -> int:
    """File offset of a cluster's refcount entry (refcount widths of 8 bits or more)."""
    lay = layout(path)
    cs, width = lay["cluster_size"], (1 << lay["refcount_order"]) // 8
    per = cs // width
    block = lay["reftable"][cluster // per] & ~0x1FF
    return int(block + cluster % per * width)


def _first_l2_entry(path: Path) -> int:
    """File offset of the first allocated entry of the first L2 table."""
    lay = layout(path)
    l2 = next(e for e in lay["l1"] if e) & 0x00FFFFFFFFFFFE00
    i = 0
    while not _u64(path, l2 + 8 * i):
        i += 1
    return int(l2 + 8 * i)


def _base(p: Path) -> Path:
    return written(p, "64M", SCATTER)


def _set_refcount(p: Path, value: int, which: str) -> Path:
    _base(p)
    lay = layout(p)
    cluster = {"data": (_u64(p, _first_l2_entry(p)) & 0x00FFFFFFFFFFFE00) // lay["cluster_size"],
               "l1": lay["l1_offset"] // lay["cluster_size"],
               "free": lay["file_size"] // lay["cluster_size"] - 1}[which]
    if which == "free":  # a cluster past the end of the file that nothing references: a leak
        cluster += 1
        with open(p, "ab") as f:
            f.write(bytes(-lay["file_size"] % lay["cluster_size"] + lay["cluster_size"]))
    _patch(p, _refcount_at(p, cluster), value.to_bytes(2, "big"))
    return p


def _l2_entry(p: Path, change: Callable[[Path, int], int]) -> Path:
    _base(p)
    at = _first_l2_entry(p)
    _patch(p, at, struct.pack(">Q", change(p, _u64(p, at))))
    return p


def _l1_entry(p: Path, change: Callable[[int], int]) -> Path:
    _base(p)
    at = layout(p)["l1_offset"]
    _patch(p, at, struct.pack(">Q", change(_u64(p, at))))
    return p


def _header_bit(p: Path, bit: int) -> Path:
    _base(p)
    _patch(p, 72, struct.pack(">Q", _u64(p, 72) | 1 << bit))
    return p


DAMAGED: dict[str, Maker] = {
    "data_refcount_2": lambda p: _set_refcount(p, 2, "data"),
    "data_refcount_0": lambda p: _set_refcount(p, 0, "data"),
    "l1_refcount_0": lambda p: _set_refcount(p, 0, "l1"),
    "leaked_cluster": lambda p: _set_refcount(p, 1, "free"),
    "l2_copied_cleared": lambda p: _l2_entry(p, lambda _p, e: e & ~(1 << 63)),
    "l2_points_at_l1": lambda p: _l2_entry(p, lambda q, e: e & ~0x00FFFFFFFFFFFE00 | layout(q)["l1_offset"]),
    "l2_past_the_end": lambda p: _l2_entry(p, lambda q, e: e & ~0x00FFFFFFFFFFFE00 | layout(q)["file_size"]
                                           + (1 << 20)),
    "l2_unaligned": lambda p: _l2_entry(p, lambda _p, e: e + 512),
    "l2_reserved_bit": lambda p: _l2_entry(p, lambda _p, e: e | 1 << 57),
    "l1_copied_cleared": lambda p: _l1_entry(p, lambda e: e & ~(1 << 63)),
    "l1_reserved_bit": lambda p: _l1_entry(p, lambda e: e | 1 << 60),
    "dirty_bit": lambda p: _header_bit(p, 0),
    "corrupt_bit": lambda p: _header_bit(p, 1),
}


def _leak_by_qemu(p: Path) -> Path:
    """A real leak: clusters appended with refcount 1 (qemu-img check -r would drop them)."""
    _base(p)
    lay = layout(p)
    end = lay["file_size"] // lay["cluster_size"]
    with open(p, "ab") as f:
        f.write(bytes(-lay["file_size"] % lay["cluster_size"] + 2 * lay["cluster_size"]))
    for c in (end, end + 1):
        _patch(p, _refcount_at(p, c), (1).to_bytes(2, "big"))
    return p


def _truncated(p: Path) -> Path:
    _base(p)
    os.truncate(p, layout(p)["file_size"] - 70000)  # the last data clusters are gone
    return p


def _l1_twice(p: Path) -> Path:
    """Two L1 entries naming one L2 table."""
    written(p, "2G", ["write -q -P 1 0 64k", "write -q -P 2 1G 64k"])
    at = layout(p)["l1_offset"]
    _patch(p, at + 8, struct.pack(">Q", _u64(p, at)))
    return p


def _refblock_on_l1(p: Path) -> Path:
    """A refcount table entry naming the L1 table's cluster (after the real blocks)."""
    _base(p)
    lay = layout(p)
    _patch(p, lay["reftable_offset"] + 8 * (len(lay["reftable"]) - 1), struct.pack(">Q", lay["l1_offset"]))
    return p


def _dense_copied_cleared(p: Path) -> Path:
    """COPIED cleared in every entry of a whole L2 table of contiguous clusters."""
    dense(p, "4k", 4 << 20)
    l2 = next(e for e in layout(p)["l1"] if e) & 0x00FFFFFFFFFFFE00
    table = bytearray(p.read_bytes()[l2 : l2 + 4096])
    for i in range(0, 4096, 8):
        table[i] &= 0x7F
    _patch(p, l2, bytes(table))
    return p


DAMAGED.update(dense_copied_cleared=_dense_copied_cleared, leak_appended=_leak_by_qemu,
               truncated=_truncated, l1_twice=_l1_twice, refblock_on_l1=_refblock_on_l1)


def make(tmp_path: Path, table: dict[str, Maker], name: str) -> Path:
    return table[name](tmp_path / f"{name}.qcow2")


# ---- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_images_take_the_fast_path(tmp_path: Path, name: str) -> None:
    path = make(tmp_path, CLEAN, name)
    before = path.read_bytes()
    assert prove_clean(str(path)) is not None
    for output in ("json", "human"):
        rc, out, err, numpy = cli(f"--output={output}", str(path))
        ref = qemu_img("check", f"--output={output}", str(path), check=False)
        assert (rc, out, err) == (ref.returncode, ref.stdout, "") == (0, ref.stdout, "")
        assert (rc, out) == full(path, output)
        assert not numpy, "the fast path did not run"
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_clean_images_fall_back(tmp_path: Path, name: str) -> None:
    path = make(tmp_path, UNUSUAL, name)
    assert prove_clean(str(path)) is None
    rc, out, err, numpy = cli("--output=json", str(path))
    ref = qemu_img("check", "--output=json", str(path), check=False)
    assert (rc, out) == (ref.returncode, ref.stdout) == full(path, "json")
    assert numpy, "the full check did not run"


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_images_fall_back_to_the_full_report(tmp_path: Path, name: str) -> None:
    path = make(tmp_path, DAMAGED, name)
    before = path.read_bytes()
    assert prove_clean(str(path)) is None
    ref = qemu_img("check", str(path), check=False)
    assert ref.returncode != 0 or "dirty" in name or "corrupt" in name  # broken for QEMU too
    for output in ("json", "human"):
        rc, out, _err, numpy = cli(f"--output={output}", str(path))
        assert (rc, out) == full(path, output)
        assert numpy, "the full check did not run"
    assert path.read_bytes() == before


def test_damage_is_reported_like_qemu(tmp_path: Path) -> None:
    """The fallback's words reach the user: stdout and diagnostics as qemu-img's."""
    path = make(tmp_path, DAMAGED, "l2_copied_cleared")
    rc, out, err, _numpy = cli(str(path))
    ref = qemu_img("check", str(path), check=False)
    assert (rc, out) == (ref.returncode, ref.stdout) == (2, ref.stdout)
    assert err.splitlines() == ref.stderr.splitlines()


@pytest.mark.parametrize(
    "args", [["-q"], ["-q", "--output=json"], ["-f", "qcow2"], ["-U"], ["--force-share", "--output=json"]]
)
def test_options_on_the_fast_path(tmp_path: Path, args: list[str]) -> None:
    path = make(tmp_path, CLEAN, "sparse")
    rc, out, err, numpy = cli(*args, str(path))
    ref = qemu_img("check", *args, str(path), check=False)
    assert (rc, out, err) == (ref.returncode, ref.stdout, "")
    assert not numpy


def test_raw_and_missing_files_keep_their_errors(tmp_path: Path) -> None:
    raw = tmp_path / "x.raw"
    raw.write_bytes(bytes(65536))
    assert cli(str(raw))[:3] == (63, "", "qcow2kit: This image format does not support checks")
    assert cli("-f", "qcow2", str(raw))[0] == 63
    rc, out, err, _ = cli(str(tmp_path / "nope.qcow2"))
    assert (rc, out) == (1, "") and "No such file or directory" in err


def test_repair_never_takes_the_fast_path(tmp_path: Path) -> None:
    path = make(tmp_path, CLEAN, "sparse")
    rc, out, _err, numpy = cli("-r", "leaks", str(path))
    ref = qemu_img("check", "-r", "leaks", str(path), check=False)
    assert (rc, out) == (ref.returncode, ref.stdout)
    assert numpy


# ---- the argparse-free command line -----------------------------------------------------------
ACCEPTED = [
    ["x.qcow2"],
    ["--output=json", "x.qcow2"],
    ["--output", "human", "x.qcow2"],
    ["x.qcow2", "-q"],
    ["-U", "x.qcow2"],
    ["--force-share", "--output=human", "x.qcow2"],
    ["-f", "qcow2", "x.qcow2"],
    ["-f", "raw", "x.qcow2"],
    ["-f", "vmdk", "x.qcow2"],
    ["-q", "-q", "x.qcow2", "--output=json", "--output", "human", "-f", "raw", "-f", "qcow2"],
    ["qcow2"],
]
DECLINED = [
    [],
    ["-h"],
    ["--help", "x"],
    ["-r", "leaks", "x"],
    ["-r", "all", "x"],
    ["-rleaks", "x"],
    ["--out=json", "x"],
    ["--output=JSON", "x"],
    ["-fqcow2", "x"],
    ["-f"],
    ["-f", "-q", "x"],
    ["--output"],
    ["a", "b"],
    ["--", "x"],
    ["-"],
    ["-qU", "x"],
    ["-q"],
]


@pytest.mark.parametrize("rest", ACCEPTED, ids=" ".join)
def test_fast_args_same_as_argparse(rest: list[str]) -> None:
    from qcow2kit.cli import check as cli_check
    from qcow2kit.cli.main import build_parser

    fast = cli_check.fast_args(rest)
    assert fast is not None
    assert vars(fast) == vars(build_parser(["check"]).parse_args(["check", *rest]))


@pytest.mark.parametrize("rest", DECLINED, ids=" ".join)
def test_fast_args_declined(rest: list[str]) -> None:
    from qcow2kit.cli import check as cli_check

    assert cli_check.fast_args(rest) is None


def test_fast_path_imports_nothing_heavy(tmp_path: Path) -> None:
    path = make(tmp_path, CLEAN, "sparse")
    code = (
        "import sys\n"
        "from qcow2kit.cli.main import main\n"
        "assert main(['check', '--output=json', sys.argv[1]]) == 0\n"
        "heavy = {'numpy', 'argparse', 'json', 'qcow2kit.image', 'qcow2kit.metadata.meta',\n"
        "         'qcow2kit.metadata.check', 'qcow2kit.chain'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_scattered_clusters_are_left_to_the_full_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every cluster its own run costs the fast path Python time per cluster: past its run
    budget (made tiny here) it declines, and the result is the full check's."""
    from qcow2kit.ops import check_plain

    path = written(tmp_path / "scattered.qcow2", "1M",
                   [f"write -q -P {i % 200 + 1} {(255 - i) * 4}k 4k" for i in range(256)], "cluster_size=4k")
    assert prove_clean(str(path)) is not None
    ref = check_path(str(path))
    assert ref.fragmented_clusters == 255
    monkeypatch.setattr(check_plain, "_RUNS_FREE", 0)
    monkeypatch.setattr(check_plain, "_RUNS_EVIDENCE", 0)
    assert prove_clean(str(path)) is None


@pytest.mark.parametrize("cluster", ["512", "4k", "64k"])
def test_mutated_metadata_is_never_proven_clean_wrongly(tmp_path: Path, cluster: str) -> None:
    """Random bytes of the header, L1, L2 tables, refcount table and blocks changed: whenever
    the fast path proves the result clean, the full check agrees, number for number."""
    import random

    base = written(tmp_path / "base.qcow2", "8M", SCATTER[:3] + ["write -q -P 6 5M 100k"],
                   f"cluster_size={cluster}")
    data = base.read_bytes()
    lay = layout(base)
    cs = lay["cluster_size"]
    l2s = [e & 0x00FFFFFFFFFFFE00 for e in lay["l1"] if e]
    blocks = [e & ~0x1FF for e in lay["reftable"] if e]
    areas = [(0, 112), (lay["l1_offset"], lay["l1_size"] * 8), (lay["reftable_offset"], 64),
             *[(o, cs) for o in l2s], *[(o, min(cs, 256)) for o in blocks]]
    r = random.Random(int(cs))
    path = tmp_path / "m.qcow2"
    proven = 0
    for _ in range(120):
        buf = bytearray(data)
        for _ in range(r.randint(1, 3)):
            start, length = r.choice(areas)
            at = start + r.randrange(length)
            buf[at] = r.choice((0, 1, 0x80, r.randrange(256), buf[at] ^ 1 << r.randrange(8)))
        path.write_bytes(bytes(buf))
        fast = prove_clean(str(path))
        if fast is None:
            continue
        proven += 1
        ref = check_path(str(path))
        assert (ref.corruptions, ref.leaks, ref.check_errors, ref.error) == (0, 0, 0, None)
        assert to_json(fast, "x") == to_json(ref, "x")
    assert proven  # some mutations (of unused bytes) leave the image clean


def _ext(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data + bytes(-len(data) % 8)


@pytest.mark.parametrize(("exts", "opens"), [
    (_ext(0xE2792ACA, b"qcow2") + _ext(0x6803F857, bytes(48)), True),
    (_ext(0xE2792ACA, b"qcow2") + _ext(0xE2792ACA, b"qcow2"), False),  # twice
    (_ext(0x0537BE77, bytes(16)), False),  # crypto header without LUKS
    (_ext(0xE2792ACA, b"x" * 16), False),  # backing format name too long
    (struct.pack(">II", 0x12345678, 1 << 20), False),  # past the header cluster
    (_ext(0x12345678, b"unknown, kept"), True),
], ids=["fmt+features", "twice", "crypto", "long_fmt", "too_long", "unknown"])
def test_plain_header_extensions(tmp_path: Path, exts: bytes, opens: bool) -> None:
    from qcow2kit.io.file import FileStorage
    from qcow2kit.metadata.header_io import read_header
    from qcow2kit.ops.check_plain import plain_header

    path = written(tmp_path / "e.qcow2", "8M", ["write -q 0 64k"])
    _patch(path, 8, bytes(12))  # no backing file name
    _patch(path, 112, exts + bytes(8))
    storage = FileStorage(str(path))
    try:
        if opens:
            read_header(storage)
            plain_header(storage, storage.size())
        else:
            with pytest.raises(Exception):  # noqa: B017, PT011 - any refusal
                read_header(storage)
            with pytest.raises(Exception):  # noqa: B017, PT011
                plain_header(storage, storage.size())
    finally:
        storage.close()
