"""measure: how large a new image would be, as `qemu-img measure` 7.2 computes it.

Owns the option checks of measure (with qemu-img's wording and order), QEMU's formula for the
metadata of a fully allocated qcow2 image (qcow2_calc_prealloc_size with
qcow2_refcount_metadata_size), the data count of a source (block status over its whole
backing chain, as ops/map.py reports it: zero extents skipped, every target cluster that holds
data counted whole) and the size of the source's persistent bitmaps in the target. Never
opens anything for writing and never changes a file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InvalidArgumentError, UnsupportedFeatureError

L1E_BYTES = 8
MAX_L1_BYTES = 32 << 20
BITMAP_DIR_ENTRY_BYTES = 24
BITMAP_TABLE_ENTRY_BYTES = 8
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
# qemu-img's own create options of each target format; the file protocol's are accepted too
QCOW2_OPTIONS = frozenset({
    "size", "compat", "backing_file", "backing_fmt", "data_file", "data_file_raw", "encryption",
    "cluster_size", "preallocation", "lazy_refcounts", "refcount_bits", "compression_type",
    "extended_l2", "encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg",
    "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg",
    "encrypt.iter-time",
})
RAW_OPTIONS = frozenset({"size"})
FILE_OPTIONS = frozenset({"size", "preallocation", "nocow", "extent_size_hint"})
TARGETS = {"qcow2": QCOW2_OPTIONS, "raw": RAW_OPTIONS}


@dataclass(frozen=True, slots=True)
class Measurement:
    """What `qemu-img measure` prints: bitmaps is None where it prints no bitmaps line."""

    required: int
    fully_allocated: int
    bitmaps: int | None = None


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def refcount_metadata_bytes(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Refcount blocks plus table that count `clusters` clusters and themselves (QEMU's
    fixed point in qcow2_refcount_metadata_size, without the generous increase)."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def prealloc_bytes(virtual_size: int, cluster_size: int, refcount_order: int,
                   extended_l2: bool) -> int:
    """The size of a fully allocated qcow2 image: header, L2 and L1 tables, refcount
    structures and every data cluster (qcow2_calc_prealloc_size)."""
    aligned = _round_up(virtual_size, cluster_size)
    l2e = 16 if extended_l2 else 8
    meta = cluster_size
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // L1E_BYTES)
    meta += nl1e * L1E_BYTES
    meta += refcount_metadata_bytes((meta + aligned) // cluster_size, cluster_size,
                                    refcount_order)
    return meta + aligned


def bitmaps_bytes(bitmaps: list[tuple[str, int]], disk_bytes: int, cluster_size: int) -> int:
    """Room the persistent bitmaps (name, granularity) of a disk take in a qcow2 target with
    this cluster size: every bitmap wholly allocated, its table, and the directory."""
    total = 0
    directory = 0
    for name, granularity in bitmaps:
        bits = -(-disk_bytes // granularity)
        nbytes = -(-bits // 8)
        clusters = -(-nbytes // cluster_size)
        total += clusters * cluster_size
        total += _round_up(clusters * BITMAP_TABLE_ENTRY_BYTES, cluster_size)
        directory += _round_up(BITMAP_DIR_ENTRY_BYTES + len(name.encode()), 8)
    return total + _round_up(directory, cluster_size)


@dataclass(frozen=True, slots=True)
class _Qcow2Target:
    cluster_size: int
    version: int
    refcount_order: int
    extended_l2: bool
    preallocation: str
    backing: bool


def _bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("on", "true", "yes"):
        return True
    if value in ("off", "false", "no"):
        return False
    raise InvalidArgumentError(f"Parameter '{key}' expects 'on' or 'off'")


def _int(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"Parameter '{key}' expects a number")
    return value


def _qcow2_target(opts: dict[str, object]) -> _Qcow2Target:
    """The target options in the order qcow2_measure reads (and refuses) them."""
    extended_l2 = _bool("extended_l2", opts.get("extended_l2", False))
    cluster_size = _int("cluster_size", opts.get("cluster_size", 65536))
    if cluster_size < 512 or cluster_size > 2 << 20 or cluster_size & (cluster_size - 1):
        raise InvalidArgumentError("Cluster size must be a power of two between 512 and 2048k")
    if extended_l2 and cluster_size < 16384:
        raise InvalidArgumentError(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        )
    compat = str(opts.get("compat", "1.1"))
    if compat == "0.10":  # measure and create know no "v2" / "v3" (amend does)
        version = 2
    elif compat == "1.1":
        version = 3
    else:
        raise InvalidArgumentError(f"Invalid compatibility level: '{compat}'")
    bits = _int("refcount_bits", opts.get("refcount_bits", 16))
    if bits <= 0 or bits > 64 or bits & (bits - 1):
        raise InvalidArgumentError(
            "Refcount width must be a power of two and may not exceed 64 bits"
        )
    if version < 3 and bits != 16:
        raise InvalidArgumentError(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above "
            "(use compat=1.1 or greater)"
        )
    prealloc = str(opts.get("preallocation", "off"))
    if prealloc not in PREALLOCATION_MODES:
        raise InvalidArgumentError(f"invalid parameter value: {prealloc}")
    backing = opts.get("backing_file") not in (None, False)
    return _Qcow2Target(cluster_size, version, bits.bit_length() - 1, extended_l2, prealloc,
                        backing)


def measure(
    path: str | None = None,
    *,
    size: int | None = None,
    out_format: str = "raw",
    fmt: str | None = None,
    snapshot: str | None = None,
    force_share: bool = False,
    **options: object,
) -> Measurement:
    """Sizes of a new `out_format` image ("raw" or "qcow2") holding the disk at path (its
    whole backing chain; `snapshot` names an internal snapshot as qemu-img -l does) or an
    empty disk of `size` bytes. options are the target's create options (cluster_size,
    compat, refcount_bits, extended_l2, preallocation, backing_file, ...): ints and bools, or
    the strings -o gives. Raises InvalidArgumentError with qemu-img's wording."""
    if (path is None) == (size is None):
        raise InvalidArgumentError(
            "--size N cannot be used together with a filename." if path is not None
            else "Either --size N or one filename must be specified."
        )
    if out_format not in TARGETS:
        if out_format in ("vmdk", "vdi", "vhdx", "vpc", "qed", "qcow", "luks", "parallels"):
            raise UnsupportedFeatureError(
                f"Block driver '{out_format}' does not support size measurement"
            )
        raise InvalidArgumentError(f"Unknown file format '{out_format}'")
    allowed = TARGETS[out_format] | FILE_OPTIONS
    for key in options:
        if key not in allowed:
            raise InvalidArgumentError(
                f"Invalid parameter '{key}'\nInvalid options for file format '{out_format}'"
            )
    if path is None:
        assert size is not None
        if out_format == "raw":
            return Measurement(_round_up(size, 512), _round_up(size, 512))
        t = _qcow2_target(dict(options, size=size))
        _check_l1(size, t)
        full = prealloc_bytes(size, t.cluster_size, t.refcount_order, t.extended_l2)
        return Measurement(full - _round_up(size, t.cluster_size), full)
    return _measure_source(path, out_format, fmt, snapshot, force_share, options)


def _check_l1(size: int, t: _Qcow2Target) -> None:
    aligned = _round_up(size, t.cluster_size)
    l2e = 16 if t.extended_l2 else 8
    l2_tables = -(-(aligned // t.cluster_size) // (t.cluster_size // l2e))
    if l2_tables * L1E_BYTES > MAX_L1_BYTES:
        raise InvalidArgumentError("The image size is too large (try using a larger cluster size)")


def _measure_source(path: str, out_format: str, fmt: str | None, snapshot: str | None,
                    force_share: bool, options: dict[str, object]) -> Measurement:
    t = _qcow2_target(options) if out_format == "qcow2" else None
    if t is not None:
        _check_l1(_int("size", options.get("size", 0)), t)
    if snapshot is None:
        light = measure_light(path, fmt, force_share, t)
        if light is not None:
            return light
    from ..image import Image, open_any
    from .map import disk_size, map_image

    img = open_any(path, fmt, force_share=force_share)
    try:
        # a temporarily loaded snapshot keeps the disk's current size in QEMU
        ssize = disk_size(img)
        if snapshot is not None:
            if not isinstance(img, Image):
                raise InvalidArgumentError("Failed to load snapshot: Can't find snapshot")
            from .snapshot import parse_snapshot_option, view_snapshot

            ident, name = parse_snapshot_option(snapshot)
            view_snapshot(img, ident, name)
        if t is None:
            return Measurement(ssize, ssize)
        bitmaps: int | None = None
        if t.version >= 3 and isinstance(img, Image) and img.header.version >= 3:
            found = [(b.name, b.granularity) for b in img.bitmaps]
            bitmaps = bitmaps_bytes(found, ssize, t.cluster_size)
        source = img

        def extents() -> list[tuple[int, int, bool, bool]]:
            entries = map_image(source, 0, ssize) if ssize else []
            return [(e.start, e.length, e.data, e.zero) for e in entries]

        return _qcow2_result(t, ssize, extents, bitmaps)
    finally:
        img.close()


def measure_light(path: str, fmt: str | None, force_share: bool,
                   t: _Qcow2Target | None) -> Measurement | None:
    """The same numbers without numpy or the image code (whose import alone costs ten times
    qemu-img's whole measure), for a qcow2 source, through its backing chain, that ops/map_plain
    maps (plain images: no snapshots, bitmaps, compressed clusters, feature bits, damage);
    None for anything else, which the full path then answers (and reports every error of)."""
    from ..chain import probe_format
    from ..format import constants as C
    from ..io.file import FileStorage
    from ..metadata.header_io import read_header
    from .map_plain import plain_map

    try:
        if (fmt or probe_format(path)) != "qcow2":
            return None
        storage = FileStorage(path, False, force_share=force_share)
        try:
            header = read_header(storage)
        finally:
            storage.close()
    except Exception:  # the full path opens it again and reports the error in its words
        return None
    if header.extension(C.EXT_BITMAPS) is not None:
        return None
    found = plain_map(path, fmt, force_share=force_share)
    if isinstance(found, str):
        return None
    size = header.size
    if t is None:
        return Measurement(size, size)
    bitmaps = bitmaps_bytes([], size, t.cluster_size) if t.version >= 3 and header.version >= 3 \
        else None
    # flag codes (ops/map_format.flag_code): data in bit 0, zero in bit 1
    return _qcow2_result(t, size, lambda: [
        (a, n, bool(c & 1), bool(c & 2))
        for a, n, c in zip(found.starts, found.lengths, found.codes, strict=True)], bitmaps)


def _qcow2_result(t: _Qcow2Target, size: int,
                  extents: Callable[[], list[tuple[int, int, bool, bool]]],
                  bitmaps: int | None) -> Measurement:
    """QEMU's numbers for a qcow2 target of a `size`-byte source whose (start, length, data,
    zero) extents `extents` gives (only asked for when the data count matters)."""
    cs = t.cluster_size
    virtual = _round_up(size, cs)
    if t.backing or t.preallocation in ("falloc", "full"):
        data = virtual
    else:
        data = _data_clusters(extents(), cs) * cs
    full = prealloc_bytes(virtual, cs, t.refcount_order, t.extended_l2)
    return Measurement(full - virtual + data, full, bitmaps)


def _data_clusters(extents: list[tuple[int, int, bool, bool]], cs: int) -> int:
    """Target clusters that hold any byte of a data extent ((start, length, data, zero) each;
    QEMU rounds each data extent out to whole clusters and never counts a cluster twice)."""
    count = 0
    covered = 0  # first byte not yet counted
    for start0, length, data, zero in extents:
        if not data or zero or length == 0:
            continue
        start = max(start0, covered)
        end = start0 + length
        if start >= end:
            continue
        first = start // cs
        last = -(-end // cs)
        count += last - first
        covered = last * cs
    return count


__all__ = ["Measurement", "measure", "prealloc_bytes", "refcount_metadata_bytes",
           "bitmaps_bytes"]
