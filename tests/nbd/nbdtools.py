"""Helpers for the NBD tests: our server in-process or as `qcow2kit serve`, qemu-nbd as the
oracle, the libnbd command-line tools, a minimal raw-socket client for hostile tests, and
the system's python3-libnbd.

Every wait is bounded in count and time; every server started here is stopped by the
fixture that started it."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from qcow2kit.image import Image
from qcow2kit.nbd import NBDServer
from qcow2kit.nbd import protocol as P

QEMU_NBD = shutil.which("qemu-nbd")
NBDINFO = shutil.which("nbdinfo")
NBDCOPY = shutil.which("nbdcopy")
QCOW2KIT = [sys.executable, "-m", "qcow2kit"]
SYSTEM_DIST = "/usr/lib/python3/dist-packages"


def require_clients() -> None:
    if not (QEMU_NBD and NBDINFO and NBDCOPY):
        pytest.fail("qemu-nbd, nbdinfo and nbdcopy are required (qemu-utils, libnbd-bin)")


def libnbd() -> ModuleType:
    """python3-libnbd (a Debian package for the system python, also 3.11 here)."""
    try:
        import nbd
    except ImportError:
        if SYSTEM_DIST not in sys.path:
            sys.path.append(SYSTEM_DIST)
        try:
            import nbd
        except ImportError:
            pytest.fail("python3-libnbd is required")
    return nbd


def uri(sock: Path, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def wait_for_socket(path: Path, proc: subprocess.Popen[Any] | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.02) + 1):
        if path.exists():
            return
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"server exited ({proc.returncode}): {err}")
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear")


@contextmanager
def our_server(image_path: Path, sock: Path, *, readonly: bool = False, **opts: Any) -> Iterator[NBDServer]:
    """Our server in this process, in a background thread; stopped and the image closed on
    exit."""
    img = Image.open_path(os.fspath(image_path), writable=not readonly)
    try:
        opts.setdefault("persistent", True)
        server = NBDServer(img, readonly=readonly, **opts)
        server.listen_unix(os.fspath(sock))
        server.start()
        try:
            yield server
        finally:
            server.shutdown()
            assert server.wait(60), "the server did not stop"
    finally:
        img.close()


@contextmanager
def process(argv: list[str], sock: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def qemu_nbd(image_path: Path, sock: Path, *args: str) -> Any:
    require_clients()
    assert QEMU_NBD is not None
    return process([QEMU_NBD, "-t", "-f", "qcow2", "-k", os.fspath(sock), *args, os.fspath(image_path)], sock)


def cli_serve(image_path: Path, sock: Path, *args: str) -> Any:
    return process([*QCOW2KIT, "serve", "-f", "qcow2", "-k", os.fspath(sock), *args, os.fspath(image_path)],
                   sock)


def run(*argv: str, timeout: float = 120) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{argv} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res.stdout


# ---- a raw-socket client for protocol tests ---------------------------------------------------
class RawClient:
    """Speaks the protocol byte by byte, so tests can break it anywhere."""

    def __init__(self, sock_path: Path, timeout: float = 20.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(sock_path))

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += part
        return buf

    def closed_by_server(self) -> bool:
        """True when the server has closed the connection (reads EOF or a reset)."""
        try:
            for _ in range(1000):
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        return False

    def greet(self, flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES) -> None:
        magic, opt, hflags = P.SERVER_GREETING.unpack(self.recv(18))
        assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT)
        assert hflags == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data)

    def reply(self) -> tuple[int, int, bytes]:
        magic, opt, kind, n = P.OPTION_REPLY.unpack(self.recv(20))
        assert magic == P.REPLY_MAGIC
        return opt, kind, self.recv(n)

    def replies(self) -> list[tuple[int, bytes]]:
        """Replies up to and including the final one (ACK or an error)."""
        out = []
        for _ in range(100):
            _, kind, data = self.reply()
            out.append((kind, data))
            if kind == P.REP_ACK or kind & P.REP_FLAG_ERROR:
                return out
        raise AssertionError("no final option reply")

    def go(self, name: str = "", structured: bool = True, contexts: tuple[str, ...] = ()) -> tuple[int, int]:
        """Negotiate up to transmission; returns (size, eflags)."""
        if structured:
            self.option(P.OPT_STRUCTURED_REPLY)
            assert self.replies()[-1][0] == P.REP_ACK
        if contexts:
            body = struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(contexts))
            body += b"".join(struct.pack(">I", len(c)) + c.encode() for c in contexts)
            self.option(P.OPT_SET_META_CONTEXT, body)
            assert self.replies()[-1][0] == P.REP_ACK
        self.option(P.OPT_GO, struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0))
        size = eflags = -1
        for kind, data in self.replies():
            if kind == P.REP_INFO and struct.unpack(">H", data[:2])[0] == P.INFO_EXPORT:
                size, eflags = struct.unpack(">QH", data[2:])
            assert not kind & P.REP_FLAG_ERROR, (kind, data)
        return size, eflags

    def request(self, kind: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 1,
                payload: bytes = b"") -> None:
        self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, flags, kind, cookie, offset, length) + payload)

    def simple_reply(self) -> tuple[int, int]:
        magic, error, cookie = P.SIMPLE_REPLY.unpack(self.recv(16))
        assert magic == P.SIMPLE_REPLY_MAGIC
        return error, cookie

    def chunks(self) -> list[tuple[int, int, bytes]]:
        """Structured reply chunks (flags, type, payload) up to the DONE one."""
        out = []
        for _ in range(10000):
            magic = struct.unpack(">I", self.recv(4))[0]
            if magic == P.SIMPLE_REPLY_MAGIC:
                error, _ = struct.unpack(">IQ", self.recv(12))
                out.append((P.REPLY_FLAG_DONE, -1, struct.pack(">I", error)))
                return out
            assert magic == P.STRUCTURED_REPLY_MAGIC
            flags, kind, _cookie, n = struct.unpack(">HHQI", self.recv(16))
            out.append((flags, kind, self.recv(n)))
            if flags & P.REPLY_FLAG_DONE:
                return out
        raise AssertionError("no DONE chunk")


def error_of(chunks: list[tuple[int, int, bytes]]) -> int:
    """The error value of a reply (0 when it carries none)."""
    for _flags, kind, data in chunks:
        if kind == -1 or kind in (P.REPLY_TYPE_ERROR, P.REPLY_TYPE_ERROR_OFFSET):
            return int(struct.unpack(">I", data[:4])[0])
    return 0
