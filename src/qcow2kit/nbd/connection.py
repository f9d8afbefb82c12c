"""One client connection after the handshake: the transmission phase.

Owns request parsing and validation (qemu-nbd 7.2's checks and error values), the dispatch
of requests to the connection's workers (many in flight, replies in any order), reply framing
(simple or structured: data, hole, block status and error chunks) and sending READ data
straight from the image file with os.sendfile. A malformed request ends this connection
only; nothing here ever changes an image except through Export.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from concurrent.futures import Executor

from . import protocol as P
from .export import BYTES, FILE, ZERO, CommandError, Export, Piece, nbd_error
from .handshake import Negotiated

log = logging.getLogger("qcow2kit.nbd")

_ZEROS = bytes(1 << 20)
# reads up to this size are served by the reader thread itself: measured faster than a
# hand-over to a worker (bench/bench_nbd.py), and they never wait for the disk for long
INLINE_READ = 1 << 20
_SENDFILE_MAX = 1 << 30
_KNOWN = set(P.COMMAND_NAMES) - {P.CMD_DISC}


class _SendFailedError(Exception):
    """A reply could not be sent whole: the stream is out of frame and the client is dropped."""


class SocketChannel:
    """Blocking exact reads and whole sends on a socket; an optional deadline bounds the
    whole handshake (a client that stalls is dropped)."""

    def __init__(self, sock: socket.socket, deadline: float | None = None) -> None:
        self.sock = sock
        self.deadline = deadline

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf))
        return bytes(buf)

    def recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("handshake took too long")
                self.sock.settimeout(left)
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise EOFError("client disconnected")
            got += k

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


class _Budget:
    """Bounds the requests (and WRITE payload bytes) in flight on one connection."""

    def __init__(self, requests: int, payload_bytes: int) -> None:
        self._cond = threading.Condition()
        self._max_requests = requests
        self._max_bytes = payload_bytes
        self.requests = 0
        self.bytes = 0

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.requests >= self._max_requests or (
                self.bytes and self.bytes + n > self._max_bytes
            ):
                self._cond.wait()
            self.requests += 1
            self.bytes += n

    def release(self, n: int) -> None:
        with self._cond:
            self.requests -= 1
            self.bytes -= n
            self._cond.notify_all()

    def drain(self) -> None:
        with self._cond:
            while self.requests:
                self._cond.wait()


class Connection:
    def __init__(
        self,
        sock: socket.socket,
        export: Export,
        state: Negotiated,
        pool: Executor,
        peer: str,
        *,
        max_in_flight: int = 64,
    ) -> None:
        sock.settimeout(None)  # blocking again after the handshake's deadline (sendfile needs it)
        self.sock = sock
        self.export = export
        self.structured = state.structured
        self.contexts = state.contexts
        self.pool = pool
        self.peer = peer
        self.ch = SocketChannel(sock)
        self.send_lock = threading.Lock()
        self.budget = _Budget(max_in_flight, 128 << 20)
        self.broken = False

    # ---- reading requests ---------------------------------------------------------------
    def run(self) -> None:
        """Serve requests until the client disconnects (or breaks the protocol), then wait
        for the requests still in flight."""
        try:
            self._loop()
        except (EOFError, OSError, _SendFailedError) as exc:
            if not self.broken:
                log.debug("%s: connection ended: %s", self.peer, exc)
        except P.ProtocolError as exc:
            log.warning("%s: dropping the client: %s", self.peer, exc)
        finally:
            self.budget.drain()

    def _loop(self) -> None:
        header = memoryview(bytearray(P.REQUEST.size))
        while not self.broken:
            self.ch.recv_into(header)
            req = P.decode_request(bytes(header))
            if req.type == P.CMD_DISC:
                return
            payload: bytes | bytearray = b""
            n = 0
            if req.type == P.CMD_WRITE:
                if req.length > P.MAX_BUFFER:
                    # the payload cannot be skipped safely: answer, then drop the client
                    self._send_error(req, P.EINVAL,
                                     f"len ({req.length} ) is larger than max len ({P.MAX_BUFFER})")
                    raise P.ProtocolError(f"WRITE of {req.length} bytes is too large")
                n = req.length
            self.budget.acquire(n)
            if req.type == P.CMD_READ and req.length <= INLINE_READ:
                self._handle(req, payload, n)
                continue
            try:
                if n:
                    buf = bytearray(n)
                    self.ch.recv_into(memoryview(buf))
                    payload = buf
                self.pool.submit(self._handle, req, payload, n)
            except BaseException:
                self.budget.release(n)
                raise

    # ---- one request --------------------------------------------------------------------
    def _handle(self, req: P.Request, payload: bytes | bytearray, n: int) -> None:
        try:
            self._dispatch(req, payload)
        except _SendFailedError as exc:
            self._break(exc)
        except Exception as exc:
            error, message = nbd_error(exc)
            if error == P.EIO:
                log.error("%s: %s failed: %s", self.peer, P.COMMAND_NAMES.get(req.type), message)
            try:
                self._send_error(req, error, message)
            except _SendFailedError as failed:
                self._break(failed)
        finally:
            self.budget.release(n)

    def _break(self, exc: BaseException) -> None:
        """The socket failed while replying: nothing more can be framed on it."""
        if not self.broken:
            self.broken = True
            log.debug("%s: send failed: %s", self.peer, exc)
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _validate(self, req: P.Request) -> None:
        ex = self.export
        t = req.type
        if t not in _KNOWN:
            raise CommandError(P.EINVAL, f"invalid request type ({t}) received")
        if t in (P.CMD_READ, P.CMD_CACHE) and req.length > P.MAX_BUFFER:
            # qemu-nbd's words, its stray space included
            raise CommandError(P.EINVAL, f"len ({req.length} ) is larger than max len ({P.MAX_BUFFER})")
        if ex.readonly and t in (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM):
            raise CommandError(P.EPERM, "Export is read-only")
        if req.offset > ex.size or req.length > ex.size - req.offset:
            # the spec asks for ENOSPC on writes past the end (qemu-nbd 7.2 says EINVAL)
            err = P.ENOSPC if t in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
            raise CommandError(err, f"operation past EOF; From: {req.offset}, Len: {req.length}, "
                                    f"Size: {ex.size}")
        valid = P.CMD_FLAG_FUA
        if t == P.CMD_READ and self.structured:
            valid |= P.CMD_FLAG_DF
        elif t == P.CMD_WRITE_ZEROES:
            valid |= P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO
        elif t == P.CMD_BLOCK_STATUS:
            valid |= P.CMD_FLAG_REQ_ONE
        if req.flags & ~valid:
            name = P.COMMAND_NAMES[t].lower().replace("_", " ")
            raise CommandError(P.EINVAL, f"unsupported flags for command {name} (got {req.flags:#x})")
        if t == P.CMD_BLOCK_STATUS and not self.contexts:
            raise CommandError(P.EINVAL, "CMD_BLOCK_STATUS not negotiated")
        if t == P.CMD_BLOCK_STATUS and not req.length:
            raise CommandError(P.EINVAL, "need non-zero length")

    def _dispatch(self, req: P.Request, payload: bytes | bytearray) -> None:
        self._validate(req)
        ex = self.export
        t = req.type
        fua = bool(req.flags & P.CMD_FLAG_FUA)
        if not req.length and t in (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM):
            t = P.CMD_CACHE  # nothing to change: succeed without touching the image
        if t == P.CMD_READ:
            self._read(req)
            return
        if t == P.CMD_BLOCK_STATUS:
            self._block_status(req)
            return
        if t == P.CMD_WRITE:
            ex.write(req.offset, memoryview(payload), fua)
        elif t == P.CMD_WRITE_ZEROES:
            ex.write_zeroes(req.offset, req.length, unmap=not req.flags & P.CMD_FLAG_NO_HOLE,
                            fast=bool(req.flags & P.CMD_FLAG_FAST_ZERO), fua=fua)
        elif t == P.CMD_TRIM:
            ex.trim(req.offset, req.length, fua)
        elif t == P.CMD_FLUSH:
            ex.flush()
        # CACHE: the page cache already holds what a prefetch would fetch
        self._send(P.simple_reply(0, req.cookie))

    # ---- replies ------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        try:
            with self.send_lock:
                self.sock.sendall(data)
        except OSError as exc:
            raise _SendFailedError(str(exc)) from exc

    def _send_error(self, req: P.Request, error: int, message: str) -> None:
        if self.structured:
            self._send(P.error_chunk(req.cookie, error, message))
        else:
            self._send(P.simple_reply(error, req.cookie))

    def _block_status(self, req: P.Request) -> None:
        limit = 1 if req.flags & P.CMD_FLAG_REQ_ONE else P.MAX_EXTENTS
        per_context = self.export.block_status(req.offset, req.length, limit)
        chunks = []
        for i, cid in enumerate(self.contexts):
            extents = per_context[cid]
            done = i == len(self.contexts) - 1
            chunks.append(P.block_status_chunk(req.cookie, cid, extents, done=done))
        self._send(b"".join(chunks))

    def _read(self, req: P.Request) -> None:
        ex = self.export
        with ex.rw.shared():
            pieces = ex.read_plan(req.offset, req.length) if req.length else []
            try:
                self._send_read(req, pieces)
            except OSError as exc:
                raise _SendFailedError(str(exc)) from exc

    def _send_read(self, req: P.Request, pieces: list[Piece]) -> None:
        with self.send_lock:
            if not self.structured:
                self.sock.sendall(P.simple_reply(0, req.cookie))
                self._pieces(pieces)
            elif not pieces:
                self.sock.sendall(P.done_chunk(req.cookie))
            elif req.flags & P.CMD_FLAG_DF:
                self.sock.sendall(P.data_chunk_header(req.cookie, req.offset, req.length, done=True),
                                  socket.MSG_MORE)
                self._pieces(pieces)
            else:
                self._sparse(req, pieces)

    def _sparse(self, req: P.Request, pieces: list[Piece]) -> None:
        """Data chunks for stored stretches, hole chunks for stretches that read as zeros
        without being stored; the last chunk says DONE."""
        groups: list[list[Piece]] = []
        for p in pieces:
            if groups and (groups[-1][0].kind == ZERO) == (p.kind == ZERO):
                groups[-1].append(p)
            else:
                groups.append([p])
        pos = req.offset
        for i, group in enumerate(groups):
            n = sum(p.length for p in group)
            done = i == len(groups) - 1
            if group[0].kind == ZERO:
                self.sock.sendall(P.hole_chunk(req.cookie, pos, n, done=done))
            else:
                self.sock.sendall(P.data_chunk_header(req.cookie, pos, n, done=done), socket.MSG_MORE)
                self._pieces(group)
            pos += n

    def _pieces(self, pieces: list[Piece]) -> None:
        out = self.sock.fileno()
        for p in pieces:
            if p.kind == FILE:
                sent = 0
                while sent < p.length:
                    k = os.sendfile(out, p.fd, p.host + sent, min(p.length - sent, _SENDFILE_MAX))
                    if k == 0:
                        raise OSError("the image file ended while sending")
                    sent += k
            elif p.kind == BYTES:
                self.sock.sendall(p.data)
            else:
                left = p.length
                while left:
                    k = min(left, len(_ZEROS))
                    self.sock.sendall(memoryview(_ZEROS)[:k])
                    left -= k


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_SNDTIMEO keeps the socket blocking (for sendfile) yet bounds a send to a client
    that stopped reading, so it cannot hold the image's read lock forever."""
    whole = int(seconds)
    tv = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


__all__ = ["Connection", "SocketChannel", "set_send_timeout"]
