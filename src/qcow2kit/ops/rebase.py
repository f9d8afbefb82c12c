"""rebase: change an image's backing file, as `qemu-img rebase` 7.2 does.

Owns: the checks of rebase (qemu-img's words and order, except that a missing backing format
is refused before anything is written, where QEMU only notices after copying), safe mode's
copy (every range the overlay does not hold itself, and, when the new backing file is in the
old chain, only what the images above it hold: the old and the new backing read and compared
in 512-byte sectors, each differing run written from the old content, zeros past the old
backing's end written as zeroes; a partial cluster is completed from the old backing by the
ordinary write path), and the header rewrite (QEMU's extension order: backing format, data
file, crypto, feature table, bitmaps, then every unknown extension; the backing name after
them, stored verbatim).

Crash safety: the copied data goes through the ordinary write path and is flushed before the
header names the new backing file, so a crash leaves the old backing with an overlay that
reads the same, or the new one; the header switch is one write of cluster 0, as in QEMU.
Never writes to either backing file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np

from ..chain import backing_path
from ..errors import FormatError, Qcow2Error
from ..format import constants as C
from ..format.extensions import Extension, feature_table_bytes
from ..format.header import Header
from ..image import Image, RawImage, open_any
from ..metadata.l2map import Kind
from .commit_copy import FastReader, Writeback
from .prefetch import Prefetch

SECTOR = 512
IO_BUF_BYTES = 2 << 20
# formats qemu-img knows by name (-F takes any of them; qcow2kit reads qcow2 and raw)
QEMU_FORMATS = frozenset({
    "qcow2", "raw", "vmdk", "vdi", "vhdx", "vpc", "qed", "qcow", "luks", "parallels", "bochs",
    "cloop", "dmg", "file", "host_device", "nbd", "blkdebug", "null-co", "throttle", "quorum",
})
Progress = Callable[[float], None]
# measured: qemu-img 7.2 writes the feature-name table only into clusters larger than 4 KiB
FEATURE_TABLE_MIN_CLUSTER = 4096


class RebaseError(Qcow2Error):
    """A rebase qemu-img refuses."""


def _disk_size(img: Image | RawImage) -> int:
    if isinstance(img, RawImage):
        return -(-img.virtual_size // SECTOR) * SECTOR
    return img.virtual_size


def _combine(overlay: str, name: str) -> str:
    """QEMU's path_combine: a relative name is taken from the overlay's directory."""
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(overlay), name)


def rebased_header(h: Header, name: str | None, fmt: str | None) -> Header:
    """The header naming a new backing file (None: none), extensions in QEMU's order."""
    known = {C.EXT_BACKING_FORMAT, C.EXT_DATA_FILE, C.EXT_CRYPTO, C.EXT_FEATURE_TABLE,
             C.EXT_BITMAPS}
    exts: list[Extension] = []
    if name and fmt:
        exts.append(Extension(C.EXT_BACKING_FORMAT, fmt.encode()))
    for ext_type in (C.EXT_DATA_FILE, C.EXT_CRYPTO):
        data = h.extension(ext_type)
        if data is not None:
            exts.append(Extension(ext_type, data))
    if h.version >= 3 and h.cluster_size > FEATURE_TABLE_MIN_CLUSTER:
        exts.append(Extension(C.EXT_FEATURE_TABLE, feature_table_bytes()))
    bitmaps = h.extension(C.EXT_BITMAPS)
    if bitmaps is not None:
        exts.append(Extension(C.EXT_BITMAPS, bitmaps))
    exts += [e for e in h.extensions if e.type not in known]
    new = h.replace(extensions=tuple(exts), backing_file=name or None)
    try:
        return new.relayout()
    except FormatError:
        # like QEMU: the optional feature-name table is left out when cluster 0 is too small
        slim = tuple(e for e in exts if e.type != C.EXT_FEATURE_TABLE)
        return new.replace(extensions=slim).relayout()


def write_header(img: Image, header: Header) -> None:
    """Rewrite cluster 0 with one write (as QEMU's qcow2_update_header), after everything
    before it is durable; the open image then works on the new header."""
    img.flush()
    raw = header.to_bytes()
    cs = img.cluster_size
    img.storage.event("header_update")
    img.storage.pwrite(0, raw + bytes(cs - len(raw)))
    img.storage.flush()
    img.meta.header = header


def rebase(
    path: str,
    backing: str | None,
    *,
    backing_fmt: str | None = None,
    unsafe: bool = False,
    fmt: str | None = None,
    progress: Progress | None = None,
) -> None:
    """Make `backing` (None or "": no backing file) the backing file of the qcow2 image at
    path. Safe mode first copies into the image every range whose content would change;
    unsafe only rewrites the header. A relative name is opened relative to the image's
    directory and stored as given."""
    name = backing or ""
    if backing_fmt is not None and backing_fmt not in QEMU_FORMATS:
        raise RebaseError(f"Invalid format name: '{backing_fmt}'")
    if fmt not in (None, "qcow2"):
        if fmt == "raw":
            raise RebaseError(f"Could not change the backing file to '{name}': "
                              "Operation not supported")
        raise RebaseError(f"rebasing '{fmt}' images is not supported (only qcow2)")
    # every refusal on a read-only open first: opening for writing writes (bitmaps in use)
    _close(*_prepare(Image.open_path(path, writable=False, backing=False), path, name,
                     backing_fmt, unsafe))
    top, new = _prepare(Image.open_path(path, writable=True, backing=False), path, name,
                        backing_fmt, unsafe)
    try:
        if not unsafe:
            _copy(top, new, progress)
        write_header(top, rebased_header(top.header, name or None, backing_fmt if name else None))
    finally:
        _close(top, new)
    if progress is not None:
        progress(100.0)


def _close(top: Image, new: Image | RawImage | None) -> None:
    if new is not None:
        new.close()
    top.close()


def _prepare(top: Image, path: str, name: str, backing_fmt: str | None,
             unsafe: bool) -> tuple[Image, Image | RawImage | None]:
    """Open what safe mode reads (old chain, new backing) and refuse, in QEMU's order,
    what qemu-img refuses; the images are closed on a refusal."""
    new: Image | RawImage | None = None
    try:
        if not unsafe and top.header.backing_file:
            top.backing = _open_old_backing(path, top)
        if not unsafe and name:
            new = _open_new_backing(path, top, name, backing_fmt)
        if name and backing_fmt is None:
            # QEMU copies first and only then refuses; nothing is written here
            raise RebaseError(f"Could not change the backing file to '{name}': backing "
                              "format must be specified")
    except BaseException:
        _close(top, new)
        raise
    return top, new


def _open_old_backing(path: str, top: Image) -> Image | RawImage:
    where, chain = backing_path(path, top.header, ())
    try:
        return open_any(where, top.header.backing_format, force_share=True, chain=chain)
    except OSError as exc:
        raise RebaseError(f"Could not open '{path}': Could not open backing file: Could not "
                          f"open '{where}': {exc.strerror}") from None
    except Qcow2Error as exc:
        reason = str(exc).removeprefix(f"{where}: ")
        raise RebaseError(f"Could not open '{path}': Could not open backing file: {reason}") \
            from None


def _open_new_backing(path: str, top: Image, name: str, fmt: str | None) -> Image | RawImage:
    where = _combine(path, name)
    if fmt is not None and fmt not in ("qcow2", "raw"):
        raise RebaseError(f"Could not open new backing file '{name}': the '{fmt}' format is "
                          "not supported by qcow2kit")
    try:
        return open_any(where, fmt, force_share=True)
    except OSError as exc:
        raise RebaseError(f"Could not open new backing file '{name}': Could not open "
                          f"'{where}': {exc.strerror}") from None
    except Qcow2Error as exc:
        reason = str(exc).removeprefix(f"{where}: ")
        raise RebaseError(f"Could not open new backing file '{name}': {reason}") from None


def _chain_of(img: Image | RawImage | None) -> list[Image | RawImage]:
    out: list[Image | RawImage] = []
    while img is not None:
        out.append(img)
        img = img.backing if isinstance(img, Image) else None
    return out


def _ranges(top: Image, new: Image | RawImage | None) -> list[tuple[int, int]]:
    """[start, end) ranges the overlay does not hold; when the new backing file is already
    in the old chain, only the parts the images above it hold (QEMU's prefix chain)."""
    size = top.virtual_size
    if size == 0:
        return []
    free = [(r.guest_offset, r.end) for r in top.runs(0, size) if r.kind == Kind.UNALLOCATED]
    old_chain = _chain_of(top.backing)
    if new is None or not old_chain:
        return free
    target = os.path.realpath(new.filename)
    index = next((i for i, layer in enumerate(old_chain)
                  if os.path.realpath(layer.filename) == target), None)
    if index is None:
        return free
    held: list[tuple[int, int]] = []
    for layer in old_chain[:index]:
        end = min(size, layer.virtual_size)
        if isinstance(layer, RawImage):
            held.append((0, end))
        elif end > 0:
            held += [(r.guest_offset, r.end) for r in layer.runs(0, end)
                     if r.kind != Kind.UNALLOCATED]
    held.sort()
    out: list[tuple[int, int]] = []
    for a, b in free:
        for c, d in held:
            lo, hi = max(a, c), min(b, d)
            if lo < hi:
                out.append((lo, hi))
    return out


def _copy(top: Image, new: Image | RawImage | None, progress: Progress | None) -> None:
    ranges = _ranges(top, new)
    total = sum(b - a for a, b in ranges) or 1
    done = 0
    # the backing files are read and compared on a thread, a few pieces ahead of the writes.
    # The writes read the old backing too (to complete partial clusters) through top's own
    # objects, so the thread reads it through a second opening of its own
    old = top.backing
    old_view = open_any(old.filename, old.format_name, force_share=True) if old is not None else None
    try:
        writeback = Writeback(top.data_storage or top.storage)
        with Prefetch(_differences(old_view, new, ranges)) as pieces:
            for pos, n, differ in pieces:
                if differ is not None:
                    _write_differences(top, pos, *differ)
                    writeback.wrote(n)
                done += n
                if progress is not None:
                    progress(min(99.99, done * 100.0 / total))
    finally:
        if old_view is not None:
            old_view.close()
    top.flush()


def _differences(old: Image | RawImage | None, new: Image | RawImage | None,
                 ranges: list[tuple[int, int]]
                 ) -> Iterator[tuple[int, int, tuple[bytes, bytes, bool, int] | None]]:
    """(offset, length, None) for every piece where the old and the new backing read the
    same, else (offset, length, (old bytes, new bytes, old past its end, old size)). Reads
    only the backing files, which nothing writes during a rebase."""
    old_size = _disk_size(old) if old is not None else 0
    new_size = _disk_size(new) if new is not None else 0
    old_reader = FastReader(old) if old is not None else None
    new_reader = FastReader(new) if new is not None else None
    for a, b in ranges:
        pos = a
        while pos < b:
            n = min(IO_BUF_BYTES, b - pos)
            old_zero = pos >= old_size
            if not old_zero:
                n = min(n, old_size - pos)
            if new is not None and pos < new_size:
                n = min(n, new_size - pos)
            buf_old = bytes(n) if old_zero or old_reader is None else old_reader.read(pos, n)
            buf_new = (new_reader.read(pos, n) if new_reader is not None and pos < new_size
                       else bytes(n))
            yield pos, n, (None if buf_old == buf_new else (buf_old, buf_new, old_zero, old_size))
            pos += n


def _write_differences(top: Image, pos: int, old: bytes, new: bytes, old_zero: bool,
                       old_size: int) -> None:
    """Write the old content of every run of 512-byte sectors that differ. Past the old
    backing's end the old content is zeros, written as zeroes: like QEMU's zero write, a
    partial cluster whose rest reads as zeros by allocation (past the old backing's end, not
    held by the overlay) becomes a whole zero cluster (v3)."""
    cs = top.cluster_size
    size = top.virtual_size
    v3 = top.header.version >= 3
    n = len(old)
    pad = -n % SECTOR
    a = np.frombuffer(old + bytes(pad), dtype=np.uint8).reshape(-1, SECTOR)
    b = np.frombuffer(new + bytes(pad), dtype=np.uint8).reshape(-1, SECTOR)
    differ = (a != b).any(axis=1)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], differ.view(np.int8), [0]))))
    for s, e in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        lo, hi = s * SECTOR, min(n, e * SECTOR)
        if old_zero:
            a, b = pos + lo, pos + hi
            wide_a = a // cs * cs
            wide_b = min(size, -(-b // cs) * cs)
            if v3 and wide_a >= old_size:
                a, b = wide_a, wide_b
            top.write_zeroes(a, b - a)
        else:
            top.write(pos + lo, old[lo:hi])


__all__ = ["RebaseError", "rebase", "rebased_header", "write_header", "QEMU_FORMATS"]
