"""create: lay out and write a new qcow2 image (optionally preallocated).

Owns the checks of create's options (InvalidArgumentError, with qemu-img's wording) and the
layout of a fresh image. Never leaves a half-written file behind on failure, and never carries
command-line text in its messages (the CLI adds its own). An image without preallocation is
written without numpy or the image code (their import is ten times qemu-img's whole create);
preallocation and a backing file that must be opened import them where they are needed.
"""

from __future__ import annotations

import os

from ..errors import FormatError, InvalidArgumentError, UnsupportedFeatureError
from ..format import constants as C
from ..format.geometry import Geometry
from ..format.header import new_header
from ..io.file import FileStorage

PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def create(
    path: str | os.PathLike[str],
    size: int | None,
    *,
    cluster_size: int = 65536,
    compat: str = "1.1",
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
    extended_l2: bool = False,
    compression_type: str = "zlib",
    preallocation: str = "off",
    backing_file: str | os.PathLike[str] | None = None,
    backing_fmt: str | None = None,
    data_file: str | os.PathLike[str] | None = None,
    data_file_raw: bool = False,
) -> None:
    """Create a qcow2 image of size bytes (a multiple of 512) at path; size None takes the
    backing file's size, rounded up to 512 as qemu-img does. Raises InvalidArgumentError (a
    ValueError) for bad options, OSError when the file cannot be written."""
    path = os.fspath(path)
    backing_file = os.fspath(backing_file) if backing_file is not None else None
    data_file = os.fspath(data_file) if data_file is not None else None
    if compat in ("0.10", "v2"):
        version = 2
    elif compat in ("1.1", "v3"):
        version = 3
    else:
        raise InvalidArgumentError(f"Invalid compatibility level: '{compat}'")
    if not _power_of_two(cluster_size) or not 512 <= cluster_size <= 2 * 1024 * 1024:
        raise InvalidArgumentError(
            "Cluster size must be a power of two between 512 and 2048k"
        )
    if not _power_of_two(refcount_bits) or refcount_bits > 64:
        raise InvalidArgumentError("Refcount width must be a power of two and may not exceed 64 bits")
    if preallocation not in PREALLOCATION_MODES:
        raise InvalidArgumentError(f"Invalid preallocation mode: '{preallocation}'")
    if compression_type not in ("zlib", "zstd"):
        raise InvalidArgumentError(f"Invalid compression type: '{compression_type}'")
    if version == 2:
        for flag, name in (
            (lazy_refcounts, "Lazy refcounts"),
            (extended_l2, "Extended L2 entries"),
            (data_file is not None, "External data files"),
            (compression_type != "zlib", "Compression types other than zlib"),
        ):
            if flag:
                raise InvalidArgumentError(f"{name} only supported with compatibility level 1.1 and above")
        if refcount_bits != 16:
            raise InvalidArgumentError(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above"
            )
    if extended_l2 and cluster_size < 16384:
        raise InvalidArgumentError(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        )
    if data_file_raw and data_file is None:
        raise InvalidArgumentError("data-file-raw requires data-file")
    if data_file_raw and backing_file is not None:
        raise InvalidArgumentError("Backing file and data-file-raw cannot be used together")
    if backing_file is not None and preallocation != "off" and not extended_l2:
        raise InvalidArgumentError(
            "Backing file and preallocation can only be used at the same time if "
            "extended_l2 is on"
        )
    if backing_file is not None and (size is None or backing_fmt is None):
        from ..image import open_any

        bpath = backing_file
        if not os.path.isabs(bpath):
            bpath = os.path.join(os.path.dirname(path), bpath)
        backing = open_any(bpath, backing_fmt, force_share=True)
        try:
            backing_fmt = backing_fmt or backing.format_name
            if size is None:
                # qemu-img sizes the new image in whole sectors of the backing file
                size = -(-backing.virtual_size // 512) * 512
        finally:
            backing.close()
    if size is None:
        raise InvalidArgumentError("Image creation needs a size parameter")
    if size < 0:
        raise InvalidArgumentError("Image size must be non-negative")
    if size % 512:
        raise InvalidArgumentError(f"Image size must be a multiple of 512 bytes (got {size})")

    order = refcount_bits.bit_length() - 1
    cluster_bits = cluster_size.bit_length() - 1
    geom = Geometry(cluster_bits, order, extended_l2)
    l1_entries = geom.l1_entries_for(size)
    if l1_entries * 8 > C.MAX_L1_BYTES:
        raise InvalidArgumentError(
            "The image size is too large for file format 'qcow2' (try using a larger cluster "
            "size)"
        )
    l1_clusters = geom.clusters_for(l1_entries * 8)  # an empty disk has no L1 table (as QEMU)
    prealloc = preallocation != "off"
    n_l2 = l1_entries if prealloc else 0
    n_data = geom.clusters_for(size) if prealloc and data_file is None else 0
    e = geom.refblock_entries
    n_reftable, n_blocks = 1, 1
    while True:
        total = 1 + n_reftable + n_blocks + l1_clusters + n_l2 + n_data
        blocks = -(-total // e)
        tables = max(1, geom.clusters_for(blocks * 8))
        if (blocks, tables) == (n_blocks, n_reftable):
            break
        n_blocks, n_reftable = blocks, tables
    if n_reftable * cluster_size > C.MAX_REFTABLE_BYTES:
        raise InvalidArgumentError(f"Image size {size} needs a refcount table beyond the 8 MiB limit")
    reftable_off = cluster_size
    blocks_off = reftable_off + n_reftable * cluster_size
    l1_off = blocks_off + n_blocks * cluster_size
    l2_off = l1_off + l1_clusters * cluster_size
    data_off = l2_off + n_l2 * cluster_size

    header = new_header(
        version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_entries,
        l1_table_offset=l1_off, refcount_table_offset=reftable_off,
        refcount_table_clusters=n_reftable, refcount_order=order,
        compression_type=C.COMPRESSION_ZLIB if compression_type == "zlib" else C.COMPRESSION_ZSTD,
        lazy_refcounts=lazy_refcounts, extended_l2=extended_l2, backing_file=backing_file,
        backing_fmt=backing_fmt, data_file=data_file, data_file_raw=data_file_raw,
    )

    total = 1 + n_reftable + n_blocks + l1_clusters + n_l2 + n_data
    reftable = b"".join((blocks_off + k * cluster_size).to_bytes(8, "big") for k in range(n_blocks))
    reftable += bytes(n_reftable * cluster_size - len(reftable))
    if data_file is not None:
        dpath = data_file
        if not os.path.isabs(dpath):
            dpath = os.path.join(os.path.dirname(path), dpath)
        mode = "r+b" if os.path.exists(dpath) else "wb"
        with open(dpath, mode) as df:
            df.truncate(size if (prealloc or data_file_raw) else 0)
    storage = FileStorage(path, True, create=True)
    try:
        storage.pwrite(0, header.to_bytes())
        storage.pwrite(reftable_off, reftable)
        storage.pwrite(blocks_off, refcounts_of_first(total, n_blocks * e, order))
        l1 = bytes(l1_entries * 8)
        if prealloc:
            l1 = _preallocate(storage, geom, size, l2_off, data_off, data_file is not None)
            if preallocation == "falloc" and n_data:
                storage.allocate(data_off, n_data * cluster_size)
            elif preallocation == "full" and n_data:
                _write_zeros(storage, data_off, n_data * cluster_size)
            end = data_off + n_data * cluster_size
            if storage.size() < end:
                storage.truncate(end)
        storage.pwrite(l1_off, l1)
        if l1_entries == 0 and storage.size() < l1_off:
            storage.truncate(l1_off)
        storage.flush()
    except BaseException:
        storage.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    storage.close()


def refcounts_of_first(used: int, entries: int, order: int) -> bytes:
    """Refcount blocks of `entries` entries of 2**order bits, on-disk format (big-endian
    bytes; narrower entries packed from the low bits of each byte, as format/tables
    encodes them), counting 1 for each of the first `used` clusters and 0 after."""
    bits = 1 << order
    if bits >= 8:
        width = bits // 8
        return (1).to_bytes(width, "big") * used + bytes((entries - used) * width)
    per_byte = 8 // bits
    full, rest = divmod(used, per_byte)
    partial = bytes([sum(1 << (k * bits) for k in range(rest))]) if rest else b""
    ones = sum(1 << (k * bits) for k in range(per_byte))
    return bytes([ones]) * full + partial + bytes(entries // per_byte - full - len(partial))


def _preallocate(
    storage: FileStorage, geom: Geometry, size: int, l2_off: int, data_off: int,
    data_file: bool,
) -> bytes:
    """Write an L2 table mapping every cluster of the disk; the L1 table that names them."""
    import numpy as np

    from ..format.tables import encode_table

    l1 = np.zeros(geom.l1_entries_for(size), dtype=np.uint64)
    cs = geom.cluster_size
    n_clusters = geom.clusters_for(size)
    per = geom.l2_entries
    for i in range(len(l1)):
        lo = i * per
        hi = min(n_clusters, lo + per)
        table = np.zeros((per, 2) if geom.extended_l2 else per, dtype=np.uint64)
        guest = np.arange(lo, hi, dtype=np.uint64) * np.uint64(cs)
        host = guest if data_file else np.uint64(data_off) + guest
        entries = host | np.uint64(C.OFLAG_COPIED)
        if geom.extended_l2:
            table[: hi - lo, 0] = entries
            table[: hi - lo, 1] = C.BITMAP_ALL_ALLOC
        else:
            table[: hi - lo] = entries
        off = l2_off + i * cs
        storage.pwrite(off, encode_table(table))
        l1[i] = off | C.OFLAG_COPIED
    return encode_table(l1)


def _write_zeros(storage: FileStorage, offset: int, length: int) -> None:
    chunk = bytes(min(length, 8 << 20))
    pos = offset
    while pos < offset + length:
        n = min(len(chunk), offset + length - pos)
        storage.pwrite(pos, chunk[:n])
        pos += n


__all__ = ["create", "PREALLOCATION_MODES", "UnsupportedFeatureError", "FormatError"]
