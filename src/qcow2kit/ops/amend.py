"""amend: change the options of an existing qcow2 image, as `qemu-img amend -o` 7.2 does.

Owns the checks of amend (qemu-img's words; every refusal is decided before anything is
written, where QEMU sometimes upgrades or rewrites first) and the order of the changes, which
is QEMU's: upgrade to v3, refcount width, header update (data file name, data-file-raw off),
lazy refcounts, size, downgrade to v2. Each step is crash-safe on its own:
- a version or feature change is one rewrite of cluster 0 (as QEMU's qcow2_update_header),
  after everything it depends on is durable;
- the refcount width change is metadata/reftable_rewrite.py (new structures, flush, one
  header switch, flush, free the old);
- a downgrade first turns zero clusters into what v2 can say (unallocated without a backing
  file, zeroed data clusters with one) through the ordinary, crash-safe write path, and only
  then writes the v2 header;
- lazy refcounts off: the image is clean (opening repairs a dirty one) before the bit goes.
The image is reopened between steps, so no step works on state another step changed under
it. Never touches the backing file or the data file's contents.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import Qcow2Error, UnsupportedFeatureError
from ..format import constants as C
from ..format.extensions import Extension
from ..format.features import Autoclear, Compatible, Incompatible
from ..format.header import Header
from ..image import Image
from ..io.file import FileStorage
from ..io.storage import Storage
from ..metadata.l2map import Kind
from .rebase import rebased_header, write_header

Progress = Callable[[float], None]
ZERO_CHUNK = 4 << 20
UINT32_MAX = (1 << 32) - 1
# QEMU's largest block device: INT64_MAX aligned down to its largest request alignment
BDRV_MAX_LENGTH = 9223372035781033984


class AmendError(Qcow2Error):
    """An amendment qemu-img refuses (the message is qemu-img's)."""


@dataclass(frozen=True, slots=True)
class AmendOptions:
    """What -o asked for; None: left as it is."""

    compat: str | None = None
    size: int | None = None
    backing_file: str | None = None
    backing_fmt: str | None = None
    lazy_refcounts: bool | None = None
    refcount_bits: int | None = None
    data_file: str | None = None
    data_file_raw: bool | None = None


def _version(compat: str | None, current: int) -> int:
    if compat is None:
        return current
    if compat in ("0.10", "v2"):
        return 2
    if compat in ("1.1", "v3"):
        return 3
    raise AmendError(f"Unknown compatibility level {compat}")


@dataclass(frozen=True, slots=True)
class _Plan:
    old_version: int
    new_version: int
    refcount_order: int | None  # None: unchanged
    lazy: bool | None  # None: unchanged
    size: int | None
    snapshots: bool


def _plan(img: Image, o: AmendOptions) -> _Plan:
    """Every refusal, in QEMU's order, before anything is written."""
    h = img.header
    new_version = _version(o.compat, h.version)
    if o.data_file is not None and not h.has_data_file:
        raise AmendError("data-file can only be set for images that use an external data file")
    if o.data_file_raw and not h.data_file_raw:
        raise AmendError("data-file-raw cannot be set on existing images")
    order: int | None = None
    if o.refcount_bits is not None:
        bits = o.refcount_bits
        if bits <= 0 or bits > 64 or bits & (bits - 1):
            raise AmendError("Refcount width must be a power of two and may not exceed 64 bits")
        if bits != h.refcount_bits:
            if new_version < 3 and bits != 16:
                raise AmendError(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or "
                    "above (use compat=1.1 or greater)"
                )
            from ..metadata.reftable_rewrite import RefcountWidthError, all_refcounts, check_fits

            try:
                check_fits(all_refcounts(img.meta), img.cluster_size, bits)
            except RefcountWidthError as exc:
                raise AmendError(str(exc)) from None
            order = bits.bit_length() - 1
    if o.backing_file is not None or o.backing_fmt is not None:
        if o.backing_file != h.backing_file or o.backing_fmt != h.backing_format:
            raise AmendError("Cannot amend the backing file\n"
                             "You can use 'qemu-img rebase' instead.")
    lazy_now = bool(h.compatible_features & Compatible.LAZY_REFCOUNTS)
    lazy = None if o.lazy_refcounts is None or o.lazy_refcounts == lazy_now else o.lazy_refcounts
    if lazy and new_version < 3:
        raise AmendError("Lazy refcounts only supported with compatibility level 1.1 and above "
                         "(use compat=1.1 or greater)")
    if new_version < h.version:
        # QEMU resizes before it downgrades: snapshots are compared with the new size
        _check_downgrade(img, order if order is not None else h.refcount_order,
                         o.size or img.virtual_size)
    size = o.size if o.size else None
    if size is not None and size > BDRV_MAX_LENGTH:
        raise AmendError(f"offset({size}) exceeds maximum({BDRV_MAX_LENGTH})")
    return _Plan(h.version, new_version, order, lazy, size, bool(img.snapshots))


def _check_downgrade(img: Image, refcount_order: int, size: int) -> None:
    h = img.header
    if refcount_order != 4:
        raise AmendError("compat=0.10 requires refcount_bits=16")
    if h.has_data_file:
        raise AmendError("Cannot downgrade an image with a data file")
    for sn in img.snapshots:
        if sn.vm_state_size_large > UINT32_MAX or sn.disk_size != size:
            raise AmendError("Internal snapshots prevent downgrade of image")
    incompat = h.incompatible_features & ~Incompatible.DIRTY
    if incompat & ~Incompatible.COMPRESSION_TYPE:
        raise AmendError(f"Cannot downgrade an image with incompatible features {incompat:#x} set")
    if h.compression_type == C.COMPRESSION_ZSTD and _has_kind(img, Kind.COMPRESSED):
        raise AmendError("Cannot downgrade an image with zstd compression type and existing "
                         "compressed clusters")
    if len(img.bitmaps):
        # QEMU keeps the bitmaps extension in the v2 header, leaving bitmaps that every later
        # open calls inconsistent (and two leaked clusters): refused rather than copied
        raise UnsupportedFeatureError(
            "downgrading an image with persistent bitmaps is not supported (remove them first)")
    if img.snapshots:
        from ..metadata.zero_expand import check_snapshot_zero_clusters

        check_snapshot_zero_clusters(img.storage)


def _has_kind(img: Image, kind: Kind) -> bool:
    size = img.virtual_size
    return size > 0 and any(r.kind == kind for r in img.runs(0, size))


def amend(
    path: str,
    options: AmendOptions,
    *,
    fmt: str | None = None,
    progress: Progress | None = None,
) -> None:
    """Amend the qcow2 image at path (see AmendOptions)."""
    if fmt not in (None, "qcow2"):
        raise AmendError(f"Format driver '{fmt}' does not support option amendment")
    if fmt is None:
        from ..chain import probe_format

        probed = probe_format(path)
        if probed != "qcow2":
            raise AmendError(f"Format driver '{probed}' does not support option amendment")
    amend_storage(lambda writable: FileStorage(os.fspath(path), writable), options,
                  progress=progress)


def amend_storage(
    open_storage: Callable[[bool], Storage],
    options: AmendOptions,
    *,
    backing: bool = True,
    progress: Progress | None = None,
) -> None:
    """amend over storages that open_storage(writable) hands out, one per step (each is
    closed). The checks run on a read-only open, so a refusal writes nothing (a dirty image
    is repaired first, as opening it for writing does)."""

    def opened(writable: bool = True) -> Image:
        storage = open_storage(writable)
        try:
            return Image(storage, backing=backing)
        except BaseException:
            storage.close()
            raise

    if progress is not None:
        progress(0.0)
    with opened(False) as img:
        dirty = bool(img.header.incompatible_features & Incompatible.DIRTY)
    if dirty:
        with opened():
            pass  # a read-write open repairs the refcounts lazy refcounts left behind
    with opened(False) as img:
        plan = _plan(img, options)
    if plan.new_version > plan.old_version:
        with opened() as img:
            _upgrade(img)
    if plan.refcount_order is not None:
        from ..metadata.reftable_rewrite import change_refcount_order

        storage = open_storage(True)
        try:
            change_refcount_order(storage, plan.refcount_order)
        finally:
            storage.close()
    with opened() as img:
        # QEMU rewrites the header here whatever changed
        write_header(img, _updated_header(img.header, options))
    if plan.lazy is not None:
        with opened() as img:
            bits = img.header.compatible_features
            bits = bits | Compatible.LAZY_REFCOUNTS if plan.lazy else bits & ~Compatible.LAZY_REFCOUNTS
            # off: the open repaired a dirty image, and nothing was written since
            assert not img.header.incompatible_features & Incompatible.DIRTY
            write_header(img, _normalised(img.header.replace(compatible_features=int(bits))))
    if plan.size is not None:
        with opened() as img:
            img.resize(plan.size, shrink=True)
    if plan.new_version < plan.old_version:
        with opened() as img:
            _expand_zero_clusters(img)
        if plan.snapshots:
            from ..metadata.zero_expand import expand_snapshot_zero_clusters

            storage = open_storage(True)
            try:
                expand_snapshot_zero_clusters(storage)
            finally:
                storage.close()
        with opened() as img:
            write_header(img, _downgraded(img.header))
    if progress is not None:
        progress(100.0)


def _normalised(h: Header) -> Header:
    """The header as QEMU's qcow2_update_header writes it (its extension order)."""
    return rebased_header(h, h.backing_file, h.backing_format if h.backing_file else None)


def _upgrade(img: Image) -> None:
    """v3 needs every snapshot's 64-bit VM state size and disk size: a table whose entries
    lack them is rewritten first (the snapshot code's new-table-then-switch commit, which
    completes every entry as QEMU does), then the v3 header."""
    if any(len(sn.extra_data) < 16 for sn in img.snapshots):
        from ..metadata.refchanges import RefChanges
        from ..metadata.snapshot_commit import TableReader
        from ..metadata.snapshot_commit import commit as switch_state
        from ..metadata.snapshots import completed

        meta = img.meta
        meta.release_pending()
        meta.flush()
        size = meta.header.size
        switch_state(meta, RefChanges(meta), TableReader(meta), size=size,
                     active_l1=meta.l2.l1.copy(),
                     snapshots=[completed(sn, size) for sn in meta.snapshots],
                     old_l1_kept=False)
    h = img.header
    write_header(img, _normalised(h.replace(
        version=3, header_length=C.V3_HEADER_LENGTH, refcount_order=4,
        incompatible_features=0, compatible_features=0, autoclear_features=0,
        compression_type=C.COMPRESSION_ZLIB, unknown_fields=b"",
    )))


def _updated_header(h: Header, o: AmendOptions) -> Header:
    autoclear = h.autoclear_features
    if o.data_file_raw is False:
        autoclear &= ~Autoclear.DATA_FILE_RAW
    exts = h.extensions
    if o.data_file is not None:
        # rewritten only: the new file is not checked (QEMU neither checks it)
        kept = tuple(e for e in exts if e.type != C.EXT_DATA_FILE)
        exts = kept + ((Extension(C.EXT_DATA_FILE, o.data_file.encode()),) if o.data_file else ())
    return _normalised(h.replace(autoclear_features=int(autoclear), extensions=exts))


def _expand_zero_clusters(img: Image) -> None:
    """What v2 cannot say: zero clusters become unallocated (no backing file: they read as
    zeros anyway) or data clusters holding zeros (the backing file must not show through)."""
    size = img.virtual_size
    if size == 0:
        return
    for run in img.runs(0, size):
        if run.kind != Kind.ZERO:
            continue
        if img.backing is None and run.host_offset < 0:
            img.discard(run.guest_offset, run.length)
            continue
        pos = run.guest_offset
        while pos < run.end:
            n = min(ZERO_CHUNK, run.end - pos)
            img.write(pos, bytes(n))
            pos += n
    img.flush()
    img.meta.clear_dirty_bit()  # lazy refcounts: v2 has no dirty bit


def _downgraded(h: Header) -> Header:
    v2 = h.replace(
        version=2, header_length=C.V2_HEADER_LENGTH, refcount_order=4,
        incompatible_features=0, compatible_features=0, autoclear_features=0,
        compression_type=C.COMPRESSION_ZLIB, unknown_fields=b"",
    )
    return _normalised(v2)


def parse_options(raw: dict[str, str], parse_size: Callable[[str, str], int],
                  parse_number: Callable[[str, str], int],
                  parse_bool: Callable[[str, str], bool]) -> AmendOptions:
    """-o key=value pairs -> AmendOptions, refusing what amend does not take with
    qemu-img's words (value parsers come from the command line, with their wording)."""
    creation_only = {"cluster_size", "preallocation", "encryption", "compression_type",
                     "extended_l2", "encrypt.format", "encrypt.key-secret",
                     "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.ivgen-alg",
                     "encrypt.ivgen-hash-alg", "encrypt.hash-alg"}
    encrypt = {"encrypt.iter-time", "encrypt.keyslot", "encrypt.new-secret",
               "encrypt.old-secret", "encrypt.state"}
    known = {"compat", "size", "backing_file", "backing_fmt", "lazy_refcounts",
             "refcount_bits", "data_file", "data_file_raw"}
    for key in raw:
        if key in creation_only:
            raise AmendError(f"Invalid parameter '{key}'\n"
                             "This option is only supported for image creation")
        if key not in known and key not in encrypt:
            raise AmendError(f"Invalid parameter '{key}'")
    values: dict[str, object] = {}
    for key, value in raw.items():
        if key == "size":
            values[key] = parse_size(key, value)
        elif key == "refcount_bits":
            values[key] = parse_number(key, value)
        elif key in ("lazy_refcounts", "data_file_raw"):
            values[key] = parse_bool(key, value)
        elif key in encrypt:
            raise AmendError("Can't amend encryption options - encryption not present")
        else:
            values[key] = value
    return AmendOptions(**values)  # type: ignore[arg-type]


__all__ = ["AmendError", "AmendOptions", "amend", "amend_storage", "parse_options"]

