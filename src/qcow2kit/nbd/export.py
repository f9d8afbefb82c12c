"""The export: one open qcow2 Image seen as an NBD block device, with qemu-nbd 7.2's
semantics for every command (read plans, write / zero / trim / flush / cache, block status
for base:allocation and qemu:allocation-depth, and qemu:dirty-bitmap:NAME from the image's
persistent bitmap).

Owns the locking around the Image: `meta` serialises every Image call (its caches are not
thread-safe); `rw` lets READs keep the host clusters they are sending (shared) while
anything that may free or reuse clusters waits (exclusive). Uses only the Image's public
API and ops.map; never speaks the wire protocol (connection.py does) and never closes the
image (its opener does).
"""

from __future__ import annotations

import bisect
import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np

from ..errors import InvalidArgumentError
from ..image import Image, RawImage
from ..metadata.l2map import Kind, Run
from ..ops.map import MapEntry, map_image
from . import protocol as P

ZERO, FILE, BYTES = 0, 1, 2
RUN_CHUNK = 1 << 20
MAP_WINDOW = 64 << 20
RUN_CACHE_CHUNKS = 1 << 14  # 16 GiB of guest space


class CommandError(Exception):
    """A command failed with an NBD error value (the connection goes on)."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


@dataclass(slots=True)
class Piece:
    """One stretch of a read: zeros that are not stored (ZERO), bytes of a host file
    (FILE: fd and host offset, sendable with os.sendfile), or bytes in memory (BYTES)."""

    kind: int
    length: int
    fd: int = -1
    host: int = 0
    data: bytes = b""


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, CommandError):
        return exc.error
    if isinstance(exc, InvalidArgumentError):
        return P.EINVAL
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return P.ENOSPC
    return P.EIO


def nbd_error(exc: BaseException) -> tuple[int, str]:
    """The NBD error value and message for an exception raised by a command."""
    return _errno_of(exc), str(exc) or type(exc).__name__


class Export:
    def __init__(
        self,
        image: Image,
        *,
        name: str = "",
        description: str = "",
        readonly: bool = False,
        multi_conn: bool = False,
        allocation_depth: bool = False,
        bitmap: str | None = None,
        discard: str = "ignore",
        detect_zeroes: str = "off",
    ) -> None:
        self.image = image
        self.bitmap = bitmap
        if bitmap is not None:
            image.bitmaps.loaded_bits(bitmap)  # missing or inconsistent: refused up front
        self.name = name
        self.description = description
        self.readonly = readonly or not image.writable
        self.discard_unmap = discard == "unmap"
        self.detect_zeroes = detect_zeroes
        self.size = image.virtual_size
        self.meta = threading.Lock()
        self._map_cache: tuple[int, int, list[int], list[MapEntry]] | None = None
        self._file_sizes: dict[int, int] = {}  # fd -> size, for _clip_to_files
        self._run_cache: dict[tuple[int, int], list[Run]] = {}  # (chain depth, chunk)
        self.rw = RWLock()
        flags = P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_SEND_FUA | P.TF_SEND_DF | P.TF_SEND_CACHE
        if self.readonly:
            flags |= P.TF_READ_ONLY
        else:
            flags |= P.TF_SEND_TRIM | P.TF_SEND_WRITE_ZEROES | P.TF_SEND_FAST_ZERO
        if multi_conn:
            flags |= P.TF_CAN_MULTI_CONN
        self.eflags = flags
        self._backed: list[bool] = []  # per chain depth: has that layer a backing file?
        layer: Image | RawImage | None = image
        while isinstance(layer, Image):
            self._backed.append(layer.backing is not None)
            layer = layer.backing
        self.contexts: tuple[str, ...] = (P.CTX_BASE_ALLOCATION,) + (
            (P.CTX_ALLOCATION_DEPTH,) if allocation_depth else ()
        ) + ((P.CTX_DIRTY_BITMAP + bitmap,) if bitmap is not None else ())

    # ---- reads --------------------------------------------------------------------------
    def read_plan(self, offset: int, length: int) -> list[Piece]:
        """Where the bytes of a guest range come from. Call with `rw` held shared until the
        pieces are sent, so no FILE piece's clusters are freed and reused meanwhile."""
        with self.meta:
            pieces: list[Piece] = []
            self._plan(self.image, 0, offset, length, pieces)
            return _clip_to_files(pieces, self._file_sizes)

    def _runs(self, img: Image, depth: int, offset: int, length: int) -> list[Run]:
        """img.runs, remembered per chunk of RUN_CHUNK bytes: reads then cost no table
        lookup once their chunk was seen. Any change to the image forgets them (_changed)."""
        chunk = max(img.cluster_size, RUN_CHUNK)
        end = offset + length
        out: list[Run] = []
        for c in range(offset // chunk, -(-end // chunk)):
            key = (depth, c)
            runs = self._run_cache.get(key)
            if runs is None:
                if len(self._run_cache) >= RUN_CACHE_CHUNKS:
                    self._run_cache.clear()
                start = c * chunk
                runs = self._run_cache[key] = img.runs(start, min(chunk, img.virtual_size - start))
            for r in runs:
                a, b = max(r.guest_offset, offset), min(r.end, end)
                if a < b:
                    host = r.host_offset
                    if host >= 0 and r.kind != Kind.COMPRESSED:
                        host += a - r.guest_offset
                    out.append(Run(a, b - a, r.kind, host, r.comp_bytes, r.comp_guest_cluster))
        return out

    def _changed(self) -> None:
        self._run_cache.clear()
        self._file_sizes.clear()
        self._map_cache = None

    def _plan(self, img: Image | RawImage, depth: int, offset: int, length: int, out: list[Piece]) -> None:
        if isinstance(img, RawImage):
            fd = getattr(img.storage, "fd", None)
            n = max(0, min(length, img.virtual_size - offset))
            if n and fd is not None:
                _add(out, Piece(FILE, n, fd, offset))
            elif n:
                _add(out, Piece(BYTES, n, data=img.read(offset, n)))
            if length > n:
                _add(out, Piece(ZERO, length - n))
            return
        storage = img.data_storage or img.storage
        dfd = getattr(storage, "fd", None)
        for run in self._runs(img, depth, offset, length):
            if run.kind == Kind.DATA and dfd is not None:
                _add(out, Piece(FILE, run.length, dfd, run.host_offset))
            elif run.kind == Kind.ZERO or (run.kind == Kind.UNALLOCATED and img.backing is None):
                _add(out, Piece(ZERO, run.length))
            elif run.kind == Kind.UNALLOCATED and img.backing is not None:
                back = img.backing
                n = max(0, min(run.length, back.virtual_size - run.guest_offset))
                if n:
                    self._plan(back, depth + 1, run.guest_offset, n, out)
                if run.length > n:
                    _add(out, Piece(ZERO, run.length - n))
            else:
                _add(out, Piece(BYTES, run.length, data=img.read(run.guest_offset, run.length)))

    # ---- writes -------------------------------------------------------------------------
    def _writable(self) -> None:
        if self.readonly:
            raise CommandError(P.EPERM, "export is read-only")

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        self._writable()
        if self.detect_zeroes != "off" and _is_zero(data):
            self.write_zeroes(offset, len(data), unmap=self.detect_zeroes == "unmap",
                              fast=False, fua=fua)
            return
        with self.rw.exclusive(), self.meta:
            self._changed()
            self.image.write(offset, data)
            if fua:
                self.image.flush()

    def write_zeroes(self, offset: int, length: int, *, unmap: bool, fast: bool, fua: bool) -> None:
        """qemu's write-zeroes: unmaps unless the client said NO_HOLE (whatever --discard
        says, as qemu-nbd 7.2 measured); a FAST_ZERO request fails with ENOTSUP where
        zeroing would mean writing bytes."""
        self._writable()
        img = self.image
        with self.rw.exclusive(), self.meta:
            self._changed()
            a, b, fallback = self._zero_range(offset, length)
            if fast and fallback:
                raise CommandError(P.ENOTSUP, "fast zeroing is not possible here")
            img.write_zeroes(a, b - a, unmap=unmap)
            if fua:
                img.flush()

    def _zero_range(self, offset: int, length: int) -> tuple[int, int, bool]:
        """The range qcow2 zeroes for a request, as qemu's qcow2_co_pwrite_zeroes decides:
        an unaligned end whose subcluster is unallocated or zero and reads as zeros beyond
        the request is widened to the whole subcluster; any other unaligned end needs zero
        bytes written (the fallback a FAST_ZERO request refuses)."""
        img = self.image
        end = offset + length
        if img.header.version < 3 and img.backing is not None:
            return offset, end, True
        unit = img.cluster_size // (32 if img.header.extended_l2 else 1)
        first_end = min(end, -(-offset // unit) * unit)
        pieces = [(offset, first_end)] if offset % unit else []
        if end % unit and end != self.size:
            tail = max(offset, end // unit * unit)
            if not pieces or tail >= first_end:
                pieces.append((tail, end))
        a, b, fallback = offset, end, False
        for p, q in pieces:
            s = p // unit * unit
            e = min(s + unit, self.size)
            if self._reads_zero(s, p) and self._reads_zero(q, e if q != self.size else q) and all(
                r.kind in (Kind.UNALLOCATED, Kind.ZERO) for r in img.runs(s, e - s)
            ):
                a, b = min(a, s), max(b, e)
            else:
                fallback = True
        return a, b, fallback

    def _reads_zero(self, a: int, b: int) -> bool:
        """Block status says zero over [a, b) (no data is read, as in qemu's is_zero)."""
        return a >= b or all(e.zero for e in map_image(self.image, a, b - a))

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """qemu's qcow2 discard: nothing unless --discard=unmap; then whole clusters only,
        which read as zeros afterwards on v3 images (zero clusters, host space freed) and
        become unallocated on v2 ones without a backing file (nothing on v2 with one)."""
        self._writable()
        img = self.image
        if not self.discard_unmap or (img.header.version < 3 and img.backing is not None):
            return  # v2 has no zero clusters: dropping to the backing file would expose it
        cs = img.cluster_size
        end = offset + length
        a = -(-offset // cs) * cs
        b = self.size if end == self.size else end // cs * cs
        if a >= b:
            return
        with self.rw.exclusive(), self.meta:
            self._changed()
            if img.header.version < 3:
                img.discard(a, b - a)
            else:
                for run in img.runs(a, b - a):
                    unallocated = run.kind == Kind.UNALLOCATED and img.backing is None
                    if unallocated or (run.kind == Kind.ZERO and run.host_offset < 0):
                        continue  # already reads as zeros with nothing to free
                    img.write_zeroes(run.guest_offset, run.length, unmap=True)
            if fua:
                img.flush()

    def flush(self) -> None:
        with self.meta:
            self.image.flush()

    # ---- block status -------------------------------------------------------------------
    def block_status(self, offset: int, length: int, max_extents: int) -> list[list[tuple[int, int]]]:
        """Extents (length, flags) of the range for every context, in context id order,
        at most max_extents each, merged like qemu-nbd and never past the range. For a few
        extents (REQ_ONE) the range is mapped in growing windows, so asking about the rest
        of a large disk costs what the answer needs, not a map of the whole range."""
        entries: list[MapEntry] = []
        pos, end = offset, offset + length
        window = end - pos if max_extents > 16 else 4 << 20
        with self.meta:
            while True:
                n = min(window, end - pos)
                entries += self._map(pos, n)
                pos += n
                # one extent more than wanted proves the wanted ones complete
                out = [self._dirty_extents(offset, pos - offset, max_extents + 1)
                       if ctx.startswith(P.CTX_DIRTY_BITMAP)
                       else self._extents(ctx, entries, max_extents + 1) for ctx in self.contexts]
                if pos >= end or all(len(x) > max_extents for x in out):
                    return [x[:max_extents] for x in out]
                window *= 4

    def _map(self, pos: int, n: int) -> list[MapEntry]:
        """map_image of [pos, pos+n), from a remembered map of at least MAP_WINDOW bytes:
        clients walk the disk with many small BLOCK_STATUS requests."""
        cache = self._map_cache
        if cache is None or not cache[0] <= pos <= pos + n <= cache[1]:
            end = min(self.size, max(pos + n, pos + MAP_WINDOW))
            found = map_image(self.image, pos, end - pos)
            cache = self._map_cache = (pos, end, [e.start for e in found], found)
        _, _, starts, found = cache
        out = []
        for e in found[max(0, bisect.bisect_right(starts, pos) - 1) :]:
            a, b = max(e.start, pos), min(e.start + e.length, pos + n)
            if e.start >= pos + n:
                break
            if a < b:
                out.append(e if (a, b - a) == (e.start, e.length) else replace(e, start=a, length=b - a))
        return out

    def _dirty_extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        """qemu:dirty-bitmap:NAME: flag 1 where the bitmap is dirty (the live, in-memory
        bitmap when the export is writable, so it shows the writes made through it)."""
        assert self.bitmap is not None
        extents: list[tuple[int, int]] = []
        for _, n, dirty in self.image.bitmaps.dirty_runs(self.bitmap, offset, length):
            if len(extents) >= limit:
                break
            extents.append((n, 1 if dirty else 0))
        return extents

    def _extents(self, ctx: str, entries: list[MapEntry], limit: int) -> list[tuple[int, int]]:
        extents: list[tuple[int, int]] = []
        for e in entries:
            if e.length == 0:
                continue
            if ctx == P.CTX_BASE_ALLOCATION:
                flags = (0 if e.data else P.STATE_HOLE) | (P.STATE_ZERO if e.zero else 0)
            elif e.present:
                flags = e.depth + 1
            else:
                # past the end of a shorter backing file, qemu counts the zeros as
                # allocated in that backing layer (bdrv_co_common_block_status_above)
                flags = e.depth + 2 if e.depth < len(self._backed) and self._backed[e.depth] else 0
            if extents and extents[-1][1] == flags:
                extents[-1] = (extents[-1][0] + e.length, flags)
            elif len(extents) < limit:
                extents.append((e.length, flags))
            else:
                break
        return extents


def _is_zero(buf: bytes | memoryview) -> bool:
    return not np.frombuffer(buf, dtype=np.uint8).any()


def _add(out: list[Piece], p: Piece) -> None:
    last = out[-1] if out else None
    if last is not None and last.kind == p.kind == ZERO:
        last.length += p.length
    elif last is not None and last.kind == p.kind == FILE and last.fd == p.fd and (
        last.host + last.length == p.host
    ):
        last.length += p.length
    else:
        out.append(p)


def _clip_to_files(pieces: list[Piece], sizes: dict[int, int]) -> list[Piece]:
    """FILE pieces past the end of their file read as zeros (as Storage.pread does);
    sendfile would send short, so those bytes become ZERO pieces. `sizes` remembers file
    sizes by fd until the image changes."""
    out: list[Piece] = []
    for p in pieces:
        if p.kind != FILE:
            out.append(p)
            continue
        if p.fd not in sizes:
            sizes[p.fd] = os.fstat(p.fd).st_size
        have = max(0, min(p.length, sizes[p.fd] - p.host))
        if have:
            out.append(Piece(FILE, have, p.fd, p.host))
        if have < p.length:
            out.append(Piece(ZERO, p.length - have))
    return out


__all__ = ["Export", "Piece", "CommandError", "RWLock", "nbd_error", "ZERO", "FILE", "BYTES"]
