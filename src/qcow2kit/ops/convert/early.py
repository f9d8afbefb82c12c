"""convert's early paths: the cases whose data can be copied before (and without) numpy and
the image code, and starting their data pump (rawpump.py).

Owns deciding, from the arguments and the files alone, whether a convert goes the early way,
and the target's life until the pump is joined:
- raw source -> plain qcow2 (`start_to_qcow2`): a layout planned from the size and the
  source's data ranges; planned.py writes the metadata after;
- plain qcow2 source (ops.map_plain answers its extents: no backing file, snapshots,
  compressed clusters...) -> sparse raw file (`start_to_raw`, `finish_raw`): only its DATA
  extents are copied; unallocated ranges and zero clusters stay holes (an allocated zero
  cluster's host bytes are stale and never read);
- raw source -> compressed qcow2 (`start_compressed`): reading and compressing start
  early (compressor.py); qcow2out.py writes the results once the image exists.
Anything else returns None before any byte was written, and the general path runs. Must not
import numpy or qcow2kit.image; never writes to the source.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from ...format import constants as C
from ...io.file import FileStorage
from .rawpump import Copy, Layout, RawPump, Run, data_ranges, plan_layout, refcount_code

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:
    from typing import Any

    from .compressor import CompressPump

QCOW2_MAGIC = b"QFI\xfb"  # as chain.probe_format probes (chain imports more)

# -o options the early raw -> qcow2 path takes (anything else goes the general way)
QCOW2_OPTIONS = {"cluster_size", "compat", "refcount_bits", "lazy_refcounts",
                 "compression_type", "preallocation"}


class Early:
    """A convert whose data pump is already running (layout None: raw output)."""

    __slots__ = ("source", "target", "layout", "pump", "options")

    def __init__(self, source: FileStorage, target: FileStorage, layout: Layout | None,
                 pump: RawPump, options: dict[str, Any]) -> None:
        self.source = source
        self.target = target
        self.layout = layout
        self.pump = pump
        self.options = options

    def fail(self) -> None:
        """Stop the pump and remove the half-made target (called while an error is raised)."""
        self.pump.abort()
        self.target.close()
        try:
            os.unlink(self.target.name)
        except OSError:
            pass


def _regular_files(src_path: str, dst_path: str) -> bool:
    """A regular source file and a regular (or new) target: what the early paths take."""
    try:
        st = os.stat(src_path)
        dst_st = os.stat(dst_path) if os.path.lexists(dst_path) else None
    except OSError:
        return False  # the general path reports it in its own words
    return stat.S_ISREG(st.st_mode) and (dst_st is None or stat.S_ISREG(dst_st.st_mode))


def _options_ok(options: dict[str, Any]) -> bool:
    """Options whose values create accepts and the planned layout covers."""
    if not set(options) <= QCOW2_OPTIONS:
        return False
    cs = options.get("cluster_size", 65536)
    bits = options.get("refcount_bits", 16)
    return not (
        options.get("preallocation", "off") != "off"
        or options.get("compat", "1.1") not in ("1.1", "v3")
        or options.get("compression_type", "zlib") not in ("zlib", "zstd")
        or not isinstance(options.get("lazy_refcounts", False), bool)
        or not isinstance(cs, int) or cs & (cs - 1) or not 512 <= cs <= 2 << 20
        or not isinstance(bits, int) or bits & (bits - 1) or not 1 <= bits <= 64
        or refcount_code(bits.bit_length() - 1) is None
    )


def _new_target(path: str) -> FileStorage:
    """The target, created or truncated, open for writing. Truncated through one
    descriptor and written through another: ext4 flushes a file truncated to 0 when that
    descriptor is closed (measured: 0.4 s for 1 GiB); closed before anything is written,
    that flush is free."""
    FileStorage(path, True, create=True).close()
    target = FileStorage(path, True)
    target.durable = False  # cache=unsafe: nothing waits for the disk
    return target


def _raw_source(src_path: str, src_fmt: str | None, force_share: bool, cs: int,
                sparse_bytes: int) -> tuple[FileStorage, int, list[tuple[int, int]]] | None:
    """The raw source opened read-only, its size in whole sectors and its data ranges (all
    of it with -S 0); None (closed again) when a probed source turns out to be qcow2."""
    source = FileStorage(src_path, False, force_share=force_share)
    try:
        if src_fmt is None and os.pread(source.fd, 4, 0) == QCOW2_MAGIC:
            source.close()
            return None
        size = -(-source.size() // 512) * 512
        ranges = data_ranges(source.fd, size, cs) if sparse_bytes else [(0, size)] if size else []
    except BaseException:
        source.close()
        raise
    return source, size, ranges


def start_to_qcow2(
    src_path: str,
    dst_path: str,
    src_fmt: str | None,
    options: dict[str, Any],
    force_share: bool,
    sparse_bytes: int,
) -> Early | None:
    """Start copying a raw source into a new plain qcow2 image, or None."""
    if src_fmt not in (None, "raw") or not _options_ok(options):
        return None
    if not _regular_files(src_path, dst_path):
        return None
    cs = options.get("cluster_size", 65536)
    order = options.get("refcount_bits", 16).bit_length() - 1
    opened = _raw_source(src_path, src_fmt, force_share, cs, sparse_bytes)
    if opened is None:
        return None
    source, size, ranges = opened
    try:
        layout = plan_layout(size, cs.bit_length() - 1, order, ranges)
        if (not size or layout.l1_entries * 8 > C.MAX_L1_BYTES
                or layout.reftable_clusters * cs > C.MAX_REFTABLE_BYTES):
            source.close()
            return None
        target = _new_target(dst_path)
    except BaseException:
        source.close()
        raise
    copies: list[Copy] = [(a, a, b - a) for a, b in ranges]
    pump = RawPump(source, target, copies, block=cs, sparse=bool(sparse_bytes), layout=layout)
    return Early(source, target, layout, pump.start(), dict(options))


def start_to_raw(
    src_path: str, dst_path: str, src_fmt: str | None, force_share: bool, sparse_bytes: int
) -> Early | None:
    """Start copying a plain qcow2 source into a sparse raw file, or None."""
    if src_fmt not in (None, "qcow2") or not sparse_bytes or not _regular_files(src_path, dst_path):
        return None
    from ..map_plain import DATA, plain_map

    # chain=False: an image with a backing file declines (its data is not all here)
    extents = plain_map(src_path, src_fmt, force_share=force_share, chain=False)
    if isinstance(extents, str):
        return None  # not plain (or not qcow2): the general path
    source = FileStorage(src_path, False, force_share=force_share)
    try:
        size = sum(extents.lengths)
        target = _new_target(dst_path)
        try:
            target.truncate(size)  # every byte not written stays a hole
        except BaseException:
            target.close()
            raise
    except BaseException:
        source.close()
        raise
    copies: list[Copy] = [
        (guest, host, length)
        for guest, length, host, code in zip(extents.starts, extents.lengths,
                                             extents.offsets, extents.codes, strict=True)
        if code == DATA  # not ZERO: its host bytes (if any) are not the guest's
    ]
    pump = RawPump(source, target, copies, block=sparse_bytes, sparse=True)
    return Early(source, target, None, pump.start(), {})


def start_compressed(
    src_path: str,
    dst_path: str,
    src_fmt: str | None,
    options: dict[str, Any],
    force_share: bool,
    sparse_bytes: int,
) -> CompressPump | None:
    """Start reading and compressing a raw source for convert -c, or None. The caller
    closes the pump and then its source."""
    cs = options.get("cluster_size", 65536)
    ctype = options.get("compression_type", "zlib")
    if (src_fmt not in (None, "raw") or not isinstance(cs, int) or cs & (cs - 1)
            or not 512 <= cs <= 2 << 20 or ctype not in ("zlib", "zstd")
            or not _regular_files(src_path, dst_path)):
        return None
    opened = _raw_source(src_path, src_fmt, force_share, cs, sparse_bytes)
    if opened is None:
        return None
    source, _, ranges = opened
    try:
        code = C.COMPRESSION_ZSTD if ctype == "zstd" else C.COMPRESSION_ZLIB
        from .compressor import CompressPump

        return CompressPump(source, ranges, cs, code, bool(sparse_bytes)).start()
    except BaseException:
        source.close()
        raise


def finish_with(early: Early, complete: Callable[[list[Run]], None]) -> None:
    """Wait for the pump, then `complete` the target with the data runs it placed; on any
    failure remove the target. The source is closed either way."""
    try:
        try:
            complete(early.pump.join())
        except BaseException:
            early.fail()
            raise
        early.target.close()
    finally:
        early.source.close()


def finish_raw(early: Early) -> None:
    """Wait for the pump of a raw output (the data is all there is)."""
    finish_with(early, lambda runs: None)


__all__ = ["Early", "QCOW2_OPTIONS", "finish_raw", "finish_with", "start_compressed", "start_to_qcow2",
           "start_to_raw"]
