"""Image locking shared with QEMU: real qemu-io / qemu-nbd processes hold the image while
qcow2kit opens it, and the other way round. QEMU 7.2's OFD lock bytes (QEMU_FACTS.md 6)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import qcow2kit
from qcow2kit.cli.main import main as cli_main
from tests.helpers import assert_clean, qemu_img, qemu_io

QEMU_IO = shutil.which("qemu-io")
QEMU_NBD = shutil.which("qemu-nbd")

WRITE_LOCK = 'Failed to get "write" lock'
SHARED_WRITE_LOCK = 'Failed to get shared "write" lock'
HINT = "Is another process using the image"


def held_ranges(path: Path) -> set[tuple[int, int]]:
    """(start, end) byte ranges of the OFD locks on path's inode, from /proc/locks."""
    ino = os.stat(path).st_ino
    out: set[tuple[int, int]] = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts:  # a blocked waiter
                continue
            if len(parts) >= 8 and parts[1] == "OFDLCK" and int(parts[5].split(":")[2]) == ino:
                out.add((int(parts[6]), int(parts[7])))
    return out


def held_bytes(path: Path) -> set[int]:
    return {b for lo, hi in held_ranges(path) for b in range(lo, hi + 1)}


def _wait_locked(path: Path, proc: subprocess.Popen[bytes], byte: int = 100) -> None:
    deadline = time.monotonic() + 15
    while byte not in held_bytes(path):
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"{proc.args} exited early ({proc.returncode}): {err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.args} never locked {path}")
        time.sleep(0.02)


@contextlib.contextmanager
def qemu_io_holding(path: Path, *opts: str) -> Iterator[subprocess.Popen[bytes]]:
    """An interactive qemu-io with the image open; stdin kept open until teardown."""
    if QEMU_IO is None:
        pytest.fail("qemu-io is required (Debian package qemu-utils)")
    proc = subprocess.Popen(
        [QEMU_IO, "-f", "qcow2", *opts, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        _wait_locked(path, proc)
        yield proc
    finally:
        _stop(proc)


@contextlib.contextmanager
def qemu_nbd_holding(path: Path, *opts: str) -> Iterator[subprocess.Popen[bytes]]:
    if QEMU_NBD is None:
        pytest.fail("qemu-nbd is required (Debian package qemu-utils)")
    sock = path.parent / f"nbd-{os.getpid()}.sock"
    proc = subprocess.Popen(
        [QEMU_NBD, "-f", "qcow2", "-k", str(sock), *opts, str(path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        _wait_locked(path, proc)
        yield proc
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if proc.stderr is not None:
        proc.stderr.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "L.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "4M")
    subprocess.run([QEMU_IO or "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8k", str(path)],
                   check=True, capture_output=True)
    return path


def _open_error(path: Path, mode: str, **kw: bool) -> str:
    with pytest.raises(qcow2kit.LockError) as err:
        qcow2kit.open(str(path), mode, **kw)
    return str(err.value)


# ---- QEMU holds the image -----------------------------------------------------------


@pytest.mark.parametrize("holder", ["qemu-io", "qemu-nbd"])
def test_qemu_writer_blocks_our_writer_and_reader(image: Path, holder: str) -> None:
    hold = qemu_io_holding if holder == "qemu-io" else qemu_nbd_holding
    with hold(image):
        msg = _open_error(image, "r+")
        assert WRITE_LOCK in msg and HINT in msg and str(image) in msg
        msg = _open_error(image, "r")
        assert SHARED_WRITE_LOCK in msg and HINT in msg
        # force-share: opens without the write-excluding locks, as qemu-img -U
        with qcow2kit.open(str(image), "r", force_share=True) as img:
            assert img.read(0, 8192) == b"\x5a" * 8192
    # the holder is gone, so are its locks
    with qcow2kit.open(str(image), "r+") as img:
        img.write(0, b"ok")


def test_qemu_reader_allows_our_reader_not_our_writer(image: Path) -> None:
    with qemu_io_holding(image, "-r"):
        with qcow2kit.open(str(image), "r") as img:
            assert img.read(0, 4) == b"\x5a" * 4
        msg = _open_error(image, "r+")
        assert WRITE_LOCK in msg and HINT in msg


def test_qemu_force_share_reader_allows_our_writer(image: Path) -> None:
    with qemu_io_holding(image, "-r", "-U"):
        with qcow2kit.open(str(image), "r+") as img:
            img.write(4096, b"w")
    qemu_io(image, "read -P 0x5a 0 4096", "read -P 0x77 4096 1", "read -P 0x5a 4097 4095")
    assert_clean(image)


def test_cli_verbs_refused_while_qemu_writes(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with qemu_io_holding(image):
        assert cli_main(["info", str(image)]) != 0
        err = capsys.readouterr().err
        assert err.startswith("qcow2kit: ") and SHARED_WRITE_LOCK in err and HINT in err
        assert cli_main(["info", "-U", str(image)]) == 0
        capsys.readouterr()
        assert cli_main(["resize", str(image), "8M"]) != 0
        err = capsys.readouterr().err
        assert err.startswith("qcow2kit: ") and WRITE_LOCK in err
        assert cli_main(["check", str(image)]) != 0
        assert SHARED_WRITE_LOCK in capsys.readouterr().err
        assert cli_main(["check", "-U", str(image)]) == 0
    assert qemu_img("info", "--output=json", str(image)).returncode == 0


# ---- qcow2kit holds the image -------------------------------------------------------


def _qemu(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def test_qemu_refuses_while_we_write(image: Path) -> None:
    with qcow2kit.open(str(image), "r+") as img:
        img.write(0, b"x")
        res = _qemu("qemu-img", "info", str(image))
        assert res.returncode == 1 and SHARED_WRITE_LOCK in res.stderr and HINT in res.stderr
        res = _qemu("qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(image))
        assert res.returncode == 1 and WRITE_LOCK in res.stderr and HINT in res.stderr
        res = _qemu("qemu-img", "resize", str(image), "8M")
        assert res.returncode == 1 and WRITE_LOCK in res.stderr
        res = _qemu("qemu-img", "check", str(image))
        assert res.returncode == 1 and SHARED_WRITE_LOCK in res.stderr
        assert _qemu("qemu-img", "info", "-U", str(image)).returncode == 0
    # released on close
    assert _qemu("qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(image)).returncode == 0


def test_qemu_alongside_our_reader(image: Path) -> None:
    with qcow2kit.open(str(image), "r"):
        assert _qemu("qemu-img", "info", str(image)).returncode == 0
        assert _qemu("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 4k", str(image)).returncode == 0
        res = _qemu("qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(image))
        assert res.returncode == 1 and WRITE_LOCK in res.stderr
    with qcow2kit.open(str(image), "r", force_share=True):
        res = _qemu("qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(image))
        assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    ("opts", "mode", "force_share"),
    [((), "r+", False), (("-r",), "r", False), (("-r", "-U"), "r", True)],
)
def test_same_lock_bytes_as_qemu(
    image: Path, opts: tuple[str, ...], mode: str, force_share: bool
) -> None:
    """/proc/locks shows exactly the bytes qemu-io takes in the same role."""
    assert held_bytes(image) == set()
    with qemu_io_holding(image, *opts):
        time.sleep(0.1)
        theirs = held_bytes(image)
    with qcow2kit.open(str(image), mode, force_share=force_share):
        ours = held_bytes(image)
    assert ours == theirs, (sorted(ours), sorted(theirs))
    expected = {"r+": {100, 101, 103, 201, 203}, "r": {100, 201, 203}}[mode]
    assert ours == ({100} if force_share else expected)


def test_lock_released_by_a_killed_holder(image: Path, tmp_path: Path) -> None:
    """OFD locks die with the process: a crashed qcow2kit writer blocks nobody."""
    script = (
        "import sys, time, qcow2kit\n"
        "img = qcow2kit.open(sys.argv[1], 'r+')\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(image)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        assert WRITE_LOCK in _open_error(image, "r+")
        res = _qemu("qemu-io", "-f", "qcow2", "-c", "write 0 4k", str(image))
        assert res.returncode == 1 and WRITE_LOCK in res.stderr
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    with qcow2kit.open(str(image), "r+") as img:
        img.write(0, b"free")
