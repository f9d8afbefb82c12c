"""Fuzzing harness shared by tests/fuzz and fuzz/long_run.py.

Seed images are made valid by qemu-img / qemu-io (several option sets, data, snapshots,
compressed clusters, a backing file, a bitmap, an external data file). The seeds are parsed
here with plain `struct` (independently of qcow2kit) into *regions*: header fields, extension
headers, L1 / L2 / reftable / refblock entries, snapshot table fields, bitmap directory,
compressed data. A mutation picks a region, a position in it and an operation; the mutated
image is then put through every public operation. The contract: each operation either
succeeds or raises `qcow2kit.Qcow2Error`; read-only operations leave every file byte-for-byte
unchanged (content hash and mtime); nothing hangs (a per-example alarm).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import random
import shutil
import signal
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import qcow2kit
from qcow2kit import Qcow2Error

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"

EXAMPLE_TIMEOUT_S = 20.0
FULL_READ_LIMIT = 8 << 20
CHUNK = 1 << 20


class FuzzTimeout(BaseException):
    """An operation ran past EXAMPLE_TIMEOUT_S: treated as a hang."""


class FuzzFailure(AssertionError):  # noqa: N818 - reads better in reports
    pass


# ---- seeds ----------------------------------------------------------------------------


@dataclass
class Seed:
    name: str
    image: bytes
    aux: dict[str, bytes] = field(default_factory=dict)  # other files next to the image
    regions: list[Region] = field(default_factory=list)


@dataclass(frozen=True)
class Region:
    """`count` items of `width` bytes at `offset`, `stride` apart (width 0: a byte blob)."""

    kind: str
    offset: int
    count: int
    width: int
    stride: int = 0


def _run(argv: list[str], cwd: Path) -> None:
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0 or "failed" in res.stdout:
        raise RuntimeError(f"{argv} failed: {res.stdout}{res.stderr}")


def _img(cwd: Path, *args: str) -> None:
    _run([QEMU_IMG, *args], cwd)


def _io(cwd: Path, path: str, *cmds: str, extra: tuple[str, ...] = ()) -> None:
    argv = [QEMU_IO, "-f", "qcow2", *extra]
    for c in cmds:
        argv += ["-c", c]
    argv.append(path)
    _run(argv, cwd)


_WRITES = (
    "write -P 0x11 0 4k",
    "write -P 0x22 8k 12k",
    "write -P 0x33 1M 4k",
    "write -z 64k 8k",
    "write -P 0x44 3M 512",
)


def _build(name: str, d: Path) -> tuple[str, list[str]]:
    """Make one seed in directory d; return (image file name, aux file names)."""
    img = "seed.qcow2"
    if name == "v3-4k-snap":
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
        _io(d, img, *_WRITES)
        _img(d, "snapshot", "-c", "snap1", img)
        _io(d, img, "write -P 0x55 0 4k", "write -P 0x66 2M 8k")
        return img, []
    if name == "v2-512-snap":
        _img(d, "create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", img, "1M")
        _io(d, img, "write -P 0x11 0 4k", "write -P 0x22 100k 3k", "write -P 0x33 1020k 4k")
        _img(d, "snapshot", "-c", "s", img)
        _io(d, img, "write -P 0x44 0 1k")
        return img, []
    if name == "v3-refbits1-lazy":
        _img(d, "create", "-f", "qcow2", "-o",
             "cluster_size=4096,refcount_bits=1,lazy_refcounts=on", img, "4M")
        _io(d, img, *_WRITES)
        return img, []
    if name == "v3-refbits64":
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=1024,refcount_bits=64", img, "2M")
        _io(d, img, "write -P 0x11 0 4k", "write -P 0x22 700k 9k", "write -z 1M 64k")
        return img, []
    if name == "extl2":
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=16k,extended_l2=on", img, "4M")
        _io(d, img, "write -P 0x11 0 512", "write -P 0x22 20k 1k", "write -z 40k 2k",
            "write -P 0x33 1M 64k", "write -P 0x44 3M 16k")
        return img, []
    if name in ("compressed-zlib", "compressed-zstd"):
        raw = d / "src.raw"
        with open(raw, "wb") as f:
            f.truncate(2 << 20)
            for i, off in enumerate((0, 4096, 65536, 1 << 20, (2 << 20) - 8192)):
                f.seek(off)
                f.write(bytes([i + 1]) * 3000 + random.Random(i).randbytes(200) + b"abc" * 300)
        ctype = "zstd" if name.endswith("zstd") else "zlib"
        _img(d, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"cluster_size=4096,compression_type={ctype}", "src.raw", img)
        raw.unlink()
        _io(d, img, "write -P 0x77 4k 1k")
        return img, []
    if name == "backing":
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=4096", "base.qcow2", "4M")
        _io(d, "base.qcow2", "write -P 0xa1 0 64k", "write -P 0xa2 2M 8k")
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2",
             "-F", "qcow2", img, "4M")
        _io(d, img, "write -P 0x11 4k 4k", "write -P 0x22 2M 1k", "write -z 32k 4k")
        return img, ["base.qcow2"]
    if name == "backing-raw":
        with open(d / "base.raw", "wb") as f:
            f.write(b"\xb1" * 8192)
            f.truncate(1 << 20)
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.raw",
             "-F", "raw", img, "2M")
        _io(d, img, "write -P 0x11 1k 2k", "write -P 0x22 1536k 1k")
        return img, ["base.raw"]
    if name == "bitmap":
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
        _img(d, "bitmap", "--add", img, "b0")
        _img(d, "bitmap", "--add", "-g", "64k", img, "b1")
        _io(d, img, *_WRITES)
        return img, []
    if name == "datafile":
        _img(d, "create", "-f", "qcow2", "-o", "cluster_size=4096,data_file=data.raw", img, "2M")
        _io(d, img, "write -P 0x11 0 4k", "write -P 0x22 1M 6k")
        return img, ["data.raw"]
    raise ValueError(name)


SEED_NAMES = (
    "v3-4k-snap",
    "v2-512-snap",
    "v3-refbits1-lazy",
    "v3-refbits64",
    "extl2",
    "compressed-zlib",
    "compressed-zstd",
    "backing",
    "backing-raw",
    "bitmap",
    "datafile",
)


def build_seeds(root: Path, names: tuple[str, ...] = SEED_NAMES) -> list[Seed]:
    seeds = []
    for name in names:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        img, aux = _build(name, d)
        seed = Seed(name, (d / img).read_bytes(), {a: (d / a).read_bytes() for a in aux})
        seed.regions = find_regions(seed.image)
        seeds.append(seed)
    return seeds


# ---- regions: an independent reading of the seed --------------------------------------

HEADER_FIELDS = (  # (offset, width) of every v2 / v3 header field
    (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8), (56, 4),
    (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4), (104, 1),
)
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def find_regions(buf: bytes) -> list[Region]:
    u32 = lambda off: struct.unpack_from(">I", buf, off)[0]  # noqa: E731
    u64 = lambda off: struct.unpack_from(">Q", buf, off)[0]  # noqa: E731
    version = u32(4)
    cbits = u32(20)
    cs = 1 << cbits
    regions: list[Region] = []
    nfields = len(HEADER_FIELDS) if version == 3 else 12
    for off, width in HEADER_FIELDS[:nfields]:
        regions.append(Region("header", off, 1, width))
    hlen = u32(100) if version == 3 else 72
    bf_off = u64(8)
    ext_end = bf_off if bf_off else cs
    pos = hlen
    bitmap_dir: tuple[int, int] | None = None
    while pos + 8 <= ext_end:
        etype, elen = u32(pos), u32(pos + 4)
        regions.append(Region("ext-type", pos, 1, 4))
        regions.append(Region("ext-len", pos + 4, 1, 4))
        if etype == 0:
            break
        if elen:
            regions.append(Region("ext-data", pos + 8, elen, 1, 1))
        if etype == 0x23852875 and elen == 24:
            bitmap_dir = (u64(pos + 24), u64(pos + 16))
            for fo, fw in ((0, 4), (4, 4), (8, 8), (16, 8)):
                regions.append(Region("bitmaps-ext", pos + 8 + fo, 1, fw))
        pos += 8 + ((elen + 7) & ~7)
    if bf_off:
        regions.append(Region("backing-name", bf_off, max(1, u32(16)), 1, 1))
    l1_size, l1_off = u32(36), u64(40)
    ext_l2 = version == 3 and bool(u64(72) & 16)
    l2_width = 16 if ext_l2 else 8
    if l1_size:
        regions.append(Region("l1", l1_off, l1_size, 8, 8))
    seen_l2: set[int] = set()

    def add_l2_of(l1_offset: int, n: int, kind: str) -> None:
        for i in range(n):
            e = u64(l1_offset + 8 * i) & OFFSET_MASK
            if e and e + cs <= len(buf) and e not in seen_l2:
                seen_l2.add(e)
                regions.append(Region(kind, e, cs // l2_width, 8, l2_width))
                if ext_l2:
                    regions.append(Region("l2-bitmap", e + 8, cs // 16, 8, 16))
                for j in range(cs // l2_width):
                    ent = u64(e + j * l2_width)
                    if ent >> 62 & 1:
                        x = 62 - (cbits - 8)
                        coff = ent & ((1 << x) - 1)
                        nsec = ((ent >> x) & ((1 << (cbits - 8)) - 1)) + 1
                        length = nsec * 512 - (coff & 511)
                        if coff + length <= len(buf):
                            regions.append(Region("compressed", coff, length, 1, 1))

    add_l2_of(l1_off, l1_size, "l2")
    rt_off, rt_clusters = u64(48), u32(56)
    regions.append(Region("reftable", rt_off, rt_clusters * cs // 8, 8, 8))
    for i in range(rt_clusters * cs // 8):
        rb = u64(rt_off + 8 * i) & ~0x1FF
        if rb and rb + cs <= len(buf):
            regions.append(Region("refblock", rb, cs, 1, 1))
    nb_snap, snap_off = u32(60), u64(64)
    pos = snap_off
    for _ in range(nb_snap):
        for fo, fw in ((0, 8), (8, 4), (12, 2), (14, 2), (32, 4), (36, 4)):
            regions.append(Region("snapshot", pos + fo, 1, fw))
        sl1_off, sl1_size = u64(pos), u32(pos + 8)
        id_len, name_len, extra = struct.unpack_from(">HH", buf, pos + 12) + (u32(pos + 36),)
        if extra:
            regions.append(Region("snapshot-extra", pos + 40, extra, 1, 1))
        if sl1_size:
            regions.append(Region("snapshot-l1", sl1_off, sl1_size, 8, 8))
            add_l2_of(sl1_off, sl1_size, "snapshot-l2")
        end = pos + 40 + extra + id_len + name_len
        pos = end + (-end % 8)
    if bitmap_dir is not None:
        doff, dsize = bitmap_dir
        regions.append(Region("bitmap-dir", doff, dsize, 1, 1))
        for fo, fw in ((0, 8), (8, 4), (12, 4), (16, 1), (17, 1), (18, 2), (20, 4)):
            regions.append(Region("bitmap-dir-entry", doff + fo, 1, fw))
        tbl_off, tbl_size = u64(doff), u32(doff + 8)
        if tbl_size:
            regions.append(Region("bitmap-table", tbl_off, tbl_size, 8, 8))
    regions.append(Region("cluster0", 0, min(cs, len(buf)), 1, 1))
    regions.append(Region("file", 0, len(buf), 1, 1))
    return [r for r in regions if r.count > 0 and r.offset + max(r.width, 1) <= len(buf)]


# ---- mutations ----------------------------------------------------------------------

# (region kind selector, region selector, position, operation, random value): the kind is
# chosen first so that the many header fields do not crowd out tables and snapshots
Mutation = tuple[int, int, int, int, int]
N_OPS = 16


def _interesting(orig: int, width: int, op: int, rnd: int, file_size: int, cs: int) -> int:
    bits = 8 * width
    top = (1 << bits) - 1
    choices = (
        0,
        1,
        top,
        1 << (bits - 1),
        orig + 1,
        orig - 1,
        orig ^ (1 << (rnd % bits)),
        rnd,
        orig + cs,
        file_size,
        file_size - cs + (rnd % 8) * 8,
        orig * 2 + 1,
        orig | (1 << 63) if bits == 64 else orig * 4,
        orig | (1 << 62) if bits == 64 else orig >> 1,
        (1 << 56) - cs if bits == 64 else 1 << (rnd % bits),
        orig | 1,
    )
    return choices[op % len(choices)] & top


def mutate(seed: Seed, mutations: list[Mutation]) -> bytes:
    buf = bytearray(seed.image)
    cs = 1 << struct.unpack_from(">I", seed.image, 20)[0]
    kinds = sorted({r.kind for r in seed.regions})
    for kind_sel, sel, position, op, rnd in mutations:
        kind = kinds[kind_sel % len(kinds)]
        of_kind = [r for r in seed.regions if r.kind == kind]
        region = of_kind[sel % len(of_kind)]
        index = position % region.count
        if region.width <= 1:
            off = region.offset + index
            if off >= len(buf):
                continue
            if op % 4 == 0:
                buf[off] = rnd & 0xFF
            elif op % 4 == 1:
                buf[off] ^= 1 << (rnd % 8)
            elif op % 4 == 2:
                n = 1 + rnd % 16
                buf[off : off + n] = bytes(min(n, len(buf) - off))
            else:
                n = 1 + rnd % 16
                buf[off : off + n] = b"\xff" * min(n, len(buf) - off)
            continue
        off = region.offset + index * region.stride
        w = region.width
        if off + w > len(buf):
            continue
        orig = int.from_bytes(buf[off : off + w], "big")
        new = _interesting(orig, w, op, rnd, len(buf), cs)
        buf[off : off + w] = new.to_bytes(w, "big")
    return bytes(buf)


# ---- running one input ---------------------------------------------------------------


def file_state(path: Path) -> tuple[str, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns


_timed_out: list[bool] = [False]


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise FuzzTimeout after `seconds`; the flag also catches a timeout that a cleanup
    handler (an image's close on the way out) replaced with another exception."""
    _timed_out[0] = False

    def on_alarm(signum: int, frame: Any) -> None:
        _timed_out[0] = True
        raise FuzzTimeout(f"operation ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def guard(what: str, fn: Callable[[], object]) -> bool:
    """Run fn; True if it succeeded, False if it raised a Qcow2Error; anything else fails."""
    try:
        fn()
        return True
    except Qcow2Error:
        if _timed_out[0]:
            raise FuzzTimeout(f"{what}: timed out (then a Qcow2Error on the way out)") from None
        return False
    except FuzzTimeout:
        raise
    except Exception as exc:
        raise FuzzFailure(f"{what}: {type(exc).__name__}: {exc}") from exc


def _read_everything(img: Any) -> None:
    size = img.virtual_size
    if size <= FULL_READ_LIMIT:
        pos = 0
        while pos < size:
            n = min(CHUNK, size - pos)
            img.read(pos, n)
            pos += n
    else:
        for off in (0, size // 2, max(0, size - CHUNK)):
            img.read(off, min(CHUNK, size - off))
    img.runs(0, size)
    list(img.snapshots)
    hdr = img.header
    _ = hdr.bitmaps, hdr.backing_format, hdr.data_file


def _write_ops(img: Any, rnd: int) -> None:
    size = img.virtual_size
    if size == 0:
        return
    cs = img.cluster_size
    offs = [0, min(size - 1, 4096 + 100), max(0, size - 3000), (rnd * 512) % size]
    for i, off in enumerate(offs):
        n = min(size - off, 3000 + cs * (i % 3))
        if i % 4 == 0:
            img.write(off, bytes([i + 1]) * n)
        elif i % 4 == 1:
            img.write_zeroes(off, n)
        elif i % 4 == 2:
            img.discard(off, n)
        else:
            img.write(off, b"\x5a" * n)
    img.read(0, min(size, 64 << 10))
    img.flush()


def _find(module: str, *names: str) -> Callable[..., Any] | None:
    """A function of a module other developers may not have written yet."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    for name in names:
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn  # type: ignore[no-any-return]
    return None


def _optional_ops() -> list[tuple[str, Callable[[str], object]]]:
    """Read-only whole-image operations (verbs) that exist in this tree, called through
    their Python functions (the CLI would turn errors into messages and hide bugs)."""
    ops: list[tuple[str, Callable[[str], object]]] = []
    info = _find("qcow2kit.ops.info", "chain_info")
    if info is not None:
        ops.append(("info", lambda p: info(p, force_share=True)))
    mapper = _find("qcow2kit.ops.map", "map_path")
    if mapper is not None:
        ops.append(("map", lambda p: mapper(p, force_share=True)))
    checker = _find("qcow2kit.ops.check", "check_path")
    if checker is not None:
        ops.append(("check", lambda p: checker(p)))
    return ops


def _resize(path: str, rnd: int) -> None:
    with qcow2kit.open(path, "r+") as img:
        size = img.virtual_size
        resize = getattr(img, "resize", None)
        if resize is None or size > 1 << 40:
            return
        resize(size + (1 << 20))
        resize(max(512, (size // 2) & ~511), shrink=True)


def _compact(path: str, rnd: int) -> None:
    with qcow2kit.open(path, "r+") as img:
        compact = getattr(img, "compact", None)
        if compact is not None:
            compact(discard_zeroes=bool(rnd & 1))


def _heavy_ops(rnd: int) -> list[tuple[str, Callable[[str], object]]]:
    """Whole-image writing operations, on the (already mutated and written) copy."""
    ops: list[tuple[str, Callable[[str], object]]] = [
        ("resize", lambda p: _resize(p, rnd)),
        ("compact", lambda p: _compact(p, rnd)),
    ]
    checker = _find("qcow2kit.ops.check", "check_path")
    if checker is not None:
        ops.append(("check -r all", lambda p: checker(p, "all")))
    return ops


def _differential(path: Path, raw: Path) -> bool:
    """QEMU as the oracle: where qemu-img can convert the mutated image too, the guest
    bytes must be the same. False when either side refuses (nothing to compare)."""
    got: list[bytes] = []

    def read() -> None:
        with qcow2kit.open(str(path), "r") as img:
            if img.virtual_size <= FULL_READ_LIMIT:
                got.append(img.read(0, img.virtual_size))

    if not guard("differential read", read) or not got:
        return False
    ours = got[0]
    res = subprocess.run([QEMU_IMG, "convert", "-U", "-f", "qcow2", "-O", "raw", str(path), str(raw)],
                         capture_output=True, text=True, errors="replace", timeout=60)
    if res.returncode != 0:
        return False
    theirs = raw.read_bytes()
    raw.unlink()
    if len(theirs) == len(ours) // 512 * 512:
        ours = ours[: len(theirs)]  # QEMU counts the virtual size in whole 512-byte sectors
    if theirs != ours:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), -1)
        raise FuzzFailure(
            f"guest data differs from qemu-img's ({len(ours)} vs {len(theirs)} bytes, first "
            f"difference at {first})"
        )
    return True


def run_input(
    work: Path,
    seed: Seed,
    data: bytes,
    rnd: int = 0,
    *,
    writes: bool = True,
    heavy: bool = True,
    differential: bool = False,
    timeout: float = EXAMPLE_TIMEOUT_S,
) -> dict[str, bool]:
    """Exercise one image; raise FuzzFailure/FuzzTimeout on a contract violation."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name, content in seed.aux.items():
        (work / name).write_bytes(content)
    path = work / "seed.qcow2"
    path.write_bytes(data)
    files = [path, *(work / n for n in seed.aux)]
    before = {f: file_state(f) for f in files}
    outcome: dict[str, bool] = {}
    with time_limit(timeout):

        def read_only() -> None:
            with qcow2kit.open(str(path), "r") as img:
                _read_everything(img)

        outcome["read"] = guard("open r / read", read_only)

        def no_backing() -> None:
            with qcow2kit.open(str(path), "r", backing=False, force_share=True) as img:
                img.read(0, min(img.virtual_size, 1 << 20))

        outcome["no-backing"] = guard("open r backing=False", no_backing)
        for name, op in _optional_ops():
            outcome[name] = guard(name, lambda op=op: op(str(path)))  # type: ignore[misc]
        if differential and outcome["read"]:
            outcome["same-as-qemu"] = _differential(path, work.parent / "qemu-out.raw")
        after = {f: file_state(f) for f in files}
        if after != before:
            changed = [str(f) for f in files if after[f] != before[f]]
            raise FuzzFailure(f"read-only operations changed {changed}")
        if writes:

            def write_path() -> None:
                with qcow2kit.open(str(path), "r+") as img:
                    _write_ops(img, rnd)

            outcome["write"] = guard("open r+ / write", write_path)
            if heavy:
                for name, op in _heavy_ops(rnd):
                    outcome[name] = guard(name, lambda op=op: op(str(path)))  # type: ignore[misc]

            def reopen() -> None:
                with qcow2kit.open(str(path), "r") as img:
                    img.read(0, min(img.virtual_size, 256 << 10))

            outcome["reopen"] = guard("reopen after writes", reopen)
    return outcome
