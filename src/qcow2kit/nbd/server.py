"""NBDServer: listening sockets, the accept loop, one thread per client (handshake, then
its request reader and its own workers), and an orderly stop.

Owns the lifecycle: qemu-nbd's limits (at most `max_clients` at once; without `persistent`
the server returns once its last client has gone), a deadline on every handshake, and
shutdown() (stop accepting, end the readers, finish the requests in flight, flush). It does
not open or close the image: the caller owns it (serve() in __init__.py opens, serves and
closes).
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..image import Image
from . import protocol as P
from .connection import Connection, SocketChannel, set_send_timeout
from .export import Export
from .handshake import ExportSpec, Handshake

log = logging.getLogger("qcow2kit.nbd")


class NBDServer:
    """Serve one Image as one NBD export. listen_unix()/listen_tcp() first, then
    serve_forever() (blocking) or start() (a background thread); shutdown() from anywhere
    (a signal handler included) stops it."""

    def __init__(
        self,
        image: Image,
        *,
        name: str = "",
        description: str = "",
        readonly: bool = False,
        max_clients: int = 1,
        persistent: bool = False,
        allocation_depth: bool = False,
        bitmap: str | None = None,
        discard: str = "ignore",
        detect_zeroes: str = "off",
        handshake_timeout: float = 10.0,
        send_timeout: float = 60.0,
        stop_grace: float = 10.0,
        workers: int = 4,
    ) -> None:
        self.export = Export(
            image, name=name, description=description, readonly=readonly,
            multi_conn=max_clients >= 2, allocation_depth=allocation_depth, bitmap=bitmap,
            discard=discard, detect_zeroes=detect_zeroes,
        )
        ex = self.export
        self.spec = ExportSpec(ex.name, ex.description, ex.size, ex.eflags, ex.contexts)
        self.max_clients = max_clients
        self.persistent = persistent
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.stop_grace = stop_grace
        self.workers = workers
        self.listeners: list[socket.socket] = []
        self.unix_paths: list[str] = []
        self._clients: dict[int, tuple[socket.socket, threading.Thread]] = {}  # by id(sock)
        self._lock = threading.Lock()
        self._served = 0
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)  # a wake-up never blocks (signal handlers write)
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    # ---- listening ----------------------------------------------------------------------
    def listen_unix(self, path: str) -> str:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        self.listeners.append(sock)
        self.unix_paths.append(path)
        return path

    def listen_socket(self, sock: socket.socket) -> None:
        """Serve on a socket that already listens (systemd socket activation)."""
        self.listeners.append(sock)

    def listen_tcp(self, host: str = "127.0.0.1", port: int = 10809) -> tuple[str, int]:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        self.listeners.append(sock)
        name = sock.getsockname()
        return str(name[0]), int(name[1])

    # ---- running ------------------------------------------------------------------------
    def start(self) -> None:
        """serve_forever() in a background thread (for tests and embedding)."""
        self._thread = threading.Thread(target=self.serve_forever, name="nbd-server", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        try:
            self._accept_loop()
        finally:
            self._stop_clients()
            try:
                self.export.flush()
            except Exception as exc:  # the image may be broken; the caller's close reports it
                log.error("flush at shutdown failed: %s", exc)
            for sock in self.listeners:
                sock.close()
            for path in self.unix_paths:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            # a late shutdown() (a second signal) must never write to a reused fd number
            r, w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = -1
            os.close(r)
            os.close(w)
            self._done.set()

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            for sock in self.listeners:
                sel.register(sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                with self._lock:
                    busy = len(self._clients)
                    finished = self._served and not busy and not self.persistent
                if finished:
                    return
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        os.read(self._wake_r, 512)
                        continue
                    if busy >= self.max_clients:
                        continue  # they wait in the backlog, as with qemu-nbd -e
                    assert isinstance(key.fileobj, socket.socket)
                    self._accept(key.fileobj)
                if busy >= self.max_clients:
                    self._wait_for_room()
        finally:
            sel.close()

    def _wait_for_room(self) -> None:
        # the listeners stay readable while the backlog holds clients: sleep on the wake
        # pipe, which every ending client writes to
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                with self._lock:
                    if len(self._clients) < self.max_clients:
                        return
                if sel.select():
                    os.read(self._wake_r, 512)
        finally:
            sel.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, addr = listener.accept()
        except OSError:
            return
        peer = str(addr) if addr else "unix client"
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_send_timeout(sock, self.send_timeout)
        t = threading.Thread(target=self._client, args=(sock, peer), name="nbd-client", daemon=True)
        with self._lock:
            self._served += 1
            self._clients[id(sock)] = (sock, t)
        t.start()

    def _client(self, sock: socket.socket, peer: str) -> None:
        key = id(sock)
        try:
            deadline = time.monotonic() + self.handshake_timeout
            try:
                state = Handshake(SocketChannel(sock, deadline), self.spec).run()
            except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
                log.debug("%s: left during the handshake: %s", peer, exc)
                return
            except (OSError, P.ProtocolError) as exc:
                log.warning("%s: handshake failed: %s", peer, exc)
                return
            if state is None or self._stopping:
                return
            # workers per connection: a client that stops reading its replies ties up
            # only its own threads, never another client's requests
            with ThreadPoolExecutor(self.workers, thread_name_prefix="nbd-worker") as pool:
                Connection(sock, self.export, state, pool, peer).run()
        except Exception:
            log.exception("%s: unexpected error", peer)
        finally:
            try:
                sock.close()
            finally:
                with self._lock:
                    self._clients.pop(key, None)
                self._wake()

    def _wake(self) -> None:
        try:
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")
        except OSError:
            pass  # closed at the very end, or the pipe is full (a wake-up is pending anyway)

    # ---- stopping -----------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop accepting, let the clients' requests in flight finish, flush. Safe to call
        from a signal handler or another thread; returns at once."""
        self._stopping = True
        self._wake()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the server has stopped (True) or the timeout passed (False)."""
        return self._done.wait(timeout)

    def _stop_clients(self) -> None:
        self._stopping = True
        with self._lock:
            clients = list(self._clients.values())
        for sock, _ in clients:
            try:
                sock.shutdown(socket.SHUT_RD)  # the reader sees EOF; replies still go out
            except OSError:
                pass
        deadline = time.monotonic() + self.stop_grace
        for _, t in clients:
            t.join(max(0.0, deadline - time.monotonic()))
        for sock, t in clients:
            if t.is_alive():
                # a client that does not read its replies: its sends fail now
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for _, t in clients:
            t.join(self.send_timeout)


__all__ = ["NBDServer"]
