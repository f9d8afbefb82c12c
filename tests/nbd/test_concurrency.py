"""Many requests in flight (python3-libnbd's async API), several connections with
multi-conn, FLUSH across connections, FAST_ZERO, and the command line: its errors in
qemu-nbd's words, SIGTERM with requests in flight, the pid file, exit after the last client."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import assert_clean, qemu_compare, qemu_img, qemu_io
from tests.nbd.nbdtools import NBDINFO, QCOW2KIT, cli_serve, libnbd, our_server, run, uri, wait_for_socket

SIZE = 8 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "i.qcow2"
    qemu_img("create", "-f", "qcow2", str(img), str(SIZE))
    qemu_io(img, "write -P 1 0 1M")
    return img


def _connect(sock: Path) -> object:
    nbd = libnbd()
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri(sock))
    return h


def _drain(h: object, cookies: list[int]) -> None:
    deadline = time.monotonic() + 120
    for _ in range(100000):
        left = [c for c in cookies if not h.aio_command_completed(c)]  # type: ignore[attr-defined]
        if not left:
            return
        assert time.monotonic() < deadline, "requests did not complete"
        h.poll(1)  # type: ignore[attr-defined]
        cookies = left
    raise AssertionError("requests did not complete")


def test_many_in_flight_on_several_connections(image: Path, tmp_path: Path) -> None:
    """64 writes and reads in flight per connection on 3 connections, random offsets and
    sizes; afterwards the image equals a mirror built from the same writes."""
    mirror = bytearray(SIZE)
    mirror[: 1 << 20] = b"\x01" * (1 << 20)
    sock = tmp_path / "s.sock"
    rng = random.Random(15)
    with our_server(image, sock, max_clients=3):
        handles = [_connect(sock) for _ in range(3)]
        for h in handles:
            assert h.can_multi_conn()  # type: ignore[attr-defined]
        for round_ in range(3):
            cookies: dict[int, list[int]] = {i: [] for i in range(3)}
            for i, h in enumerate(handles):
                # each connection writes its own slice, so the order between them is free
                # and requests in flight together never overlap (their order is free too)
                base = i * (SIZE // 3) // 65536 * 65536
                for slot in rng.sample(range((SIZE // 3) // 70000), 32):
                    off = base + slot * 70000 + rng.randrange(0, 4000)
                    n = rng.choice([512, 4096, 65536, 3000])
                    data = bytes([rng.randrange(1, 256)]) * n
                    mirror[off : off + n] = data
                    buf = libnbd().Buffer.from_bytearray(bytearray(data))
                    cookies[i].append(h.aio_pwrite(buf, off))  # type: ignore[attr-defined]
            for i, h in enumerate(handles):
                _drain(h, cookies[i])
            handles[round_].flush()  # type: ignore[attr-defined]
            reads = []
            for h in handles:
                for _ in range(32):
                    off = rng.randrange(0, SIZE - 65536)
                    buf = libnbd().Buffer(65536)
                    reads.append((h, off, buf, h.aio_pread(buf, off)))  # type: ignore[attr-defined]
            for h, off, buf, cookie in reads:
                _drain(h, [cookie])
                assert buf.to_bytearray() == mirror[off : off + 65536]
        for h in handles:
            h.shutdown()  # type: ignore[attr-defined]
    assert_clean(image)
    raw = tmp_path / "mirror.raw"
    raw.write_bytes(bytes(mirror))
    qemu_compare(image, raw)


def test_fast_zero_and_zero_writes(image: Path, tmp_path: Path) -> None:
    nbd = libnbd()
    sock = tmp_path / "s.sock"
    with our_server(image, sock):
        h = _connect(sock)
        assert h.can_fast_zero()  # type: ignore[attr-defined]
        h.zero(2 << 20, 65536, nbd.CMD_FLAG_FAST_ZERO)  # count, offset  # type: ignore[attr-defined]
        with pytest.raises(nbd.Error) as err:
            h.zero(1000, 100, nbd.CMD_FLAG_FAST_ZERO)  # type: ignore[attr-defined]
        assert err.value.errno == "ENOTSUP"
        h.zero(1000, 100, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)  # type: ignore[attr-defined]
        assert h.pread(2000, 0) == b"\x01" * 100 + bytes(1000) + b"\x01" * 900  # type: ignore[attr-defined]
        assert h.pread(65536, 65536) == bytes(65536)  # type: ignore[attr-defined]
        h.shutdown()  # type: ignore[attr-defined]
    assert_clean(image)


# ---- the command line ---------------------------------------------------------------------
def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QCOW2KIT, "serve", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, message", [
    (["nosuch.qcow2"], "Failed to blk_new_open 'nosuch.qcow2': Could not open 'nosuch.qcow2': "
                       "No such file or directory"),
    (["--discard=bogus", "IMG"], "Invalid discard mode `bogus'"),
    (["--detect-zeroes=unmap", "IMG"], "setting detect-zeroes to unmap is not allowed without "
                                       "setting discard operation to unmap"),
    (["-e", "x", "IMG"], "Invalid shared device number 'x'"),
    (["-B", "nosuch", "IMG"], "Bitmap 'nosuch' is not found"),
])
def test_cli_errors(image: Path, args: list[str], message: str) -> None:
    res = _serve(*[str(image) if a == "IMG" else a for a in args])
    assert res.returncode == 1
    assert res.stderr.strip() == f"qcow2kit: {message}"


def test_cli_bitmap_refusals_match_qemu_nbd(image: Path) -> None:
    res = _serve("-r", "-B", "bm1", str(image))
    assert res.stderr.strip() == "qcow2kit: Bitmap 'bm1' is not found"
    assert_clean(image)


def test_cli_exits_after_last_client_and_writes_pid(image: Path, tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    pid = tmp_path / "pid"
    proc = subprocess.Popen([*QCOW2KIT, "serve", "-k", str(sock), "--pid-file", str(pid), str(image)],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock, proc)
        assert pid.read_text().strip() == str(proc.pid)
        assert int(run(str(NBDINFO), "--size", uri(sock))) == SIZE
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.stderr is not None and proc.stderr.read() == ""
    proc.stderr.close()
    assert not pid.exists() and not sock.exists()
    assert_clean(image)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_writes_in_flight(image: Path, tmp_path: Path, sig: int) -> None:
    sock = tmp_path / "s.sock"
    with cli_serve(image, sock, "-t") as proc:
        h = _connect(sock)
        cookies = [
            h.aio_pwrite(libnbd().Buffer.from_bytearray(bytearray(b"\x05" * 65536)), i * 65536)  # type: ignore[attr-defined]
            for i in range(32)
        ]
        _drain(h, cookies[:1])
        os.kill(proc.pid, sig)
        assert proc.wait(60) == 0
        try:
            _drain(h, cookies)
        except Exception:
            pass  # requests cut off by the stop may fail; the image must stay consistent
    assert_clean(image)
    out = qemu_io(image, "read -P 5 0 64k")
    assert "read 65536/65536" in out


def test_tcp_on_loopback(image: Path, tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = subprocess.Popen([*QCOW2KIT, "serve", "-r", "-p", str(port), str(image)],
                            stderr=subprocess.PIPE, text=True)
    try:
        out = ""
        for _ in range(200):  # until it listens (bounded: 200 tries of at most 0.05 s)
            res = subprocess.run([str(NBDINFO), "--size", f"nbd://127.0.0.1:{port}"],
                                 capture_output=True, text=True, timeout=30)
            if res.returncode == 0:
                out = res.stdout
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        assert int(out) == SIZE
        assert proc.wait(60) == 0  # it served its one client, then left
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
