"""The one home of shared test helpers. Test modules import helpers from here, never from
another test module.

- QEMU as the oracle: qemu_img, qemu_io, qemu_check, assert_clean, qemu_compare, qemu_map,
  to_raw / raw_file (qemu-img convert -O raw, optionally of an internal snapshot);
- seeded data that does not depend on the interpreter's hash seed: pattern(seed, n),
  stable_seed(name, ...);
- an independent parser of the on-disk layout (header fields, L1, reftable, refcounts), written
  from the spec without qcow2kit code, for assertions about what an operation left on disk;
- image_in_memory(): a qemu-made (or qcow2kit-made) file opened on a MemoryStorage;
- the accessors through which tests reach qcow2kit internals (refcounts_of, l2map_of,
  set_cache_capacity), kept in one place so that a refactoring changes one function.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pytest

if TYPE_CHECKING:
    from qcow2kit.image import Image
    from qcow2kit.metadata.l2map import L2Map
    from qcow2kit.metadata.refcount import Refcounts

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

PathLike = str | os.PathLike[str]


# ---- QEMU as the oracle -------------------------------------------------------------------
def require_qemu() -> None:
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.fail("qemu-img / qemu-io are required (Debian package qemu-utils)")


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    require_qemu()
    assert QEMU_IMG is not None
    res = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(args)} failed ({res.returncode}): {res.stderr}")
    return res


def qemu_io(path: PathLike, *cmds: str, fmt: str = "qcow2", extra: tuple[str, ...] = ()) -> str:
    require_qemu()
    assert QEMU_IO is not None
    argv = [QEMU_IO, "-f", fmt, *extra]
    for c in cmds:
        argv += ["-c", c]
    argv.append(os.fspath(path))
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0 or "failed" in res.stdout or "Pattern verification failed" in res.stdout:
        raise AssertionError(f"qemu-io {cmds} failed: {res.stdout}{res.stderr}")
    return res.stdout


def qemu_check(path: PathLike) -> dict[str, Any]:
    """qemu-img check --output=json; returns the parsed JSON plus 'rc'."""
    res = qemu_img("check", "--output=json", os.fspath(path), check=False)
    try:
        out: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"qemu-img check gave no JSON: {res.stdout}{res.stderr}") from None
    out["rc"] = res.returncode
    return out


def assert_clean(path: PathLike) -> dict[str, Any]:
    """No corruptions, no leaks, no check errors, exit 0."""
    out = qemu_check(path)
    assert out.get("corruptions", 0) == 0, out
    assert out.get("leaks", 0) == 0, out
    assert out["check-errors"] == 0, out
    assert out["rc"] == 0, out
    return out


def qemu_compare(a: PathLike, b: PathLike, fa: str = "qcow2", fb: str = "raw") -> None:
    res = qemu_img("compare", "-f", fa, "-F", fb, os.fspath(a), os.fspath(b), check=False)
    assert res.returncode == 0, f"images differ: {res.stdout}{res.stderr}"


def qemu_map(path: PathLike, *extra: str) -> list[dict[str, Any]]:
    """qemu-img map --output=json, parsed."""
    out: list[dict[str, Any]] = json.loads(
        qemu_img("map", "--output=json", *extra, os.fspath(path)).stdout
    )
    return out


def map_shape(path: PathLike) -> list[tuple[int, int, int, bool, bool, bool, bool]]:
    """qemu-img map without host offset values (start, length, depth, present, zero, data,
    has an offset), adjacent equal extents merged: the allocation two tools should agree on
    when the order in which they allocate may differ."""
    out: list[tuple[int, int, int, bool, bool, bool, bool]] = []
    for e in qemu_map(path):
        key = (e["depth"], e["present"], e["zero"], e["data"], "offset" in e)
        if out and out[-1][2:] == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], *key)
        else:
            out.append((e["start"], e["length"], *key))
    return out


def raw_file(
    path: PathLike, out: PathLike, *, snapshot: str | None = None, size: int | None = None
) -> Path:
    """qemu-img convert -O raw of the image (or of one of its internal snapshots) to out;
    with size, the raw file is cut or extended to that many bytes."""
    args = ["convert", "-O", "raw"]
    if snapshot:
        args += ["-l", f"snapshot.name={snapshot}"]
    qemu_img(*args, os.fspath(path), os.fspath(out))
    if size is not None:
        os.truncate(out, size)
    return Path(out)


def to_raw(
    path: PathLike, out: PathLike, *, snapshot: str | None = None, keep: bool = True
) -> bytes:
    """The guest content as QEMU reads it; keep=False deletes the raw file afterwards."""
    raw = raw_file(path, out, snapshot=snapshot)
    data = raw.read_bytes()
    if not keep:
        raw.unlink()
    return data


def wait_for_lock(path: PathLike, timeout: float = 30.0) -> None:
    """Wait until some process holds an OFD lock on path, without taking one ourselves."""
    inode = os.stat(path).st_ino
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open("/proc/locks") as locks:
            if any(f":{inode} " in line and "OFDLCK" in line for line in locks):
                return
        time.sleep(0.05)
    raise AssertionError(f"nobody locked {path} within {timeout} s")


# ---- seeded data ----------------------------------------------------------------------------
def pattern(seed: int, n: int) -> bytes:
    """n pseudo-random (incompressible) bytes, the same for the same seed on every run."""
    return np.random.default_rng(seed).bytes(n)


def stable_seed(*parts: str | int) -> int:
    """A seed derived from names (a test's phase, parameters), unlike hash(), the same under
    every PYTHONHASHSEED, so that a failure can be replayed."""
    return zlib.crc32("\0".join(str(p) for p in parts).encode())


# ---- an independent reading of the on-disk layout -------------------------------------------
_HEADER = struct.Struct(">IIQIIQIIQQIIQ")


def layout(path: PathLike) -> dict[str, Any]:
    """Header fields, the L1 table, the refcount table and the refcount blocks that count
    nothing (or only themselves), parsed straight from the bytes (spec, not qcow2kit)."""
    data = Path(path).read_bytes()
    (_, version, _, _, cbits, size, _, l1_size, l1_off, rt_off, rt_clusters, _,
     _) = _HEADER.unpack_from(data, 0)
    order = struct.unpack_from(">I", data, 96)[0] if version >= 3 else 4
    cs = 1 << cbits
    l1 = [struct.unpack_from(">Q", data, l1_off + 8 * i)[0] for i in range(l1_size)]
    reftable = [
        struct.unpack_from(">Q", data, rt_off + 8 * i)[0] for i in range(rt_clusters * cs // 8)
    ]
    empty_blocks = []
    for i, entry in enumerate(reftable):
        off = entry & ~0x1FF
        if off and not any(data[off : off + cs]):
            empty_blocks.append(i)
        elif off:
            # a block that counts only itself is empty too
            bits = 1 << order
            per = cs * 8 // bits
            own = off // cs - i * per
            if 0 <= own < per:
                blk = bytearray(data[off : off + cs])
                if bits >= 8:
                    nb = bits // 8
                    blk[own * nb : own * nb + nb] = bytes(nb)
                else:
                    byte, shift = divmod(own * bits, 8)
                    blk[byte] &= ~(((1 << bits) - 1) << shift) & 0xFF
                if not any(blk):
                    empty_blocks.append(i)
    return {"cluster_size": cs, "size": size, "l1": l1, "l1_size": l1_size,
            "reftable": reftable, "empty_refblocks": empty_blocks, "file_size": len(data),
            "version": version, "refcount_order": order, "l1_offset": l1_off,
            "reftable_offset": rt_off, "reftable_clusters": rt_clusters}


def refcounts_on_disk(path: PathLike) -> npt.NDArray[np.uint64]:
    """Refcount of every host cluster up to the last one an existing refcount block describes
    (index = host cluster), decoded from the file's bytes: sub-byte widths least-significant
    bit first. Clusters past the end of the array have refcount 0."""
    data = Path(path).read_bytes()
    lay = layout(path)
    cs = int(lay["cluster_size"])
    bits = 1 << int(lay["refcount_order"])
    per = cs * 8 // bits
    present = [i for i, entry in enumerate(lay["reftable"]) if entry & ~0x1FF]
    out = np.zeros((present[-1] + 1 if present else 0) * per, dtype=np.uint64)
    for i, entry in enumerate(lay["reftable"]):
        off = entry & ~0x1FF
        if not off:
            continue
        block = data[off : off + cs].ljust(cs, b"\0")
        if bits >= 8:
            vals = np.frombuffer(block, dtype=f">u{bits // 8}").astype(np.uint64)
        else:
            raw = np.frombuffer(block, dtype=np.uint8)[:, None]
            shifts = np.arange(8 // bits, dtype=np.uint8) * bits
            vals = ((raw >> shifts) & ((1 << bits) - 1)).reshape(-1).astype(np.uint64)
        out[i * per : (i + 1) * per] = vals
    return out


def used_clusters(path: PathLike) -> int:
    """Host clusters with a non-zero refcount, read straight from the refcount blocks."""
    return int(np.count_nonzero(refcounts_on_disk(path)))


def read_incompatible(path: PathLike) -> int:
    """The header's incompatible feature bits (v3)."""
    with open(path, "rb") as f:
        f.seek(72)
        return int(struct.unpack(">Q", f.read(8))[0])


# ---- qcow2kit objects -------------------------------------------------------------------------
def image_in_memory(path: PathLike, *, writable: bool = True) -> Image:
    """Open a copy of the file at path on a MemoryStorage (no backing file)."""
    from qcow2kit.image import Image
    from qcow2kit.io.memory import MemoryStorage

    storage = MemoryStorage(Path(path).read_bytes(), name=os.fspath(path), writable=writable)
    return Image(storage, backing=False)


def refcounts_of(img: Image) -> Refcounts:
    """The image's Refcounts object (one place to change when metadata moves)."""
    return img.meta.refcounts


def l2map_of(img: Image) -> L2Map:
    """The image's L2Map object (one place to change when metadata moves)."""
    return img.meta.l2


def set_cache_capacity(img: Image, tables: int) -> None:
    """Shrink the L2 and refcount-block caches so that evictions happen all the time."""
    img.meta.l2.cache.capacity = tables
    img.meta.refcounts.cache.capacity = tables
