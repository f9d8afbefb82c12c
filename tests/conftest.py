"""Shared test helpers: QEMU as the oracle."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")


def _require() -> None:
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.fail("qemu-img / qemu-io are required (Debian package qemu-utils)")


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    _require()
    res = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(args)} failed ({res.returncode}): {res.stderr}")
    return res


def qemu_io(path: str | Path, *cmds: str, fmt: str = "qcow2", extra: tuple[str, ...] = ()) -> str:
    _require()
    argv = [QEMU_IO, "-f", fmt, *extra]
    for c in cmds:
        argv += ["-c", c]
    argv.append(str(path))
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0 or "failed" in res.stdout or "Pattern verification failed" in res.stdout:
        raise AssertionError(f"qemu-io {cmds} failed: {res.stdout}{res.stderr}")
    return res.stdout


def qemu_check(path: str | Path) -> dict[str, Any]:
    """qemu-img check --output=json; returns the parsed JSON plus 'rc'."""
    res = qemu_img("check", "--output=json", str(path), check=False)
    try:
        out: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"qemu-img check gave no JSON: {res.stdout}{res.stderr}") from None
    out["rc"] = res.returncode
    return out


def assert_clean(path: str | Path) -> dict[str, Any]:
    """No corruptions, no leaks, no check errors, exit 0."""
    out = qemu_check(path)
    assert out.get("corruptions", 0) == 0, out
    assert out.get("leaks", 0) == 0, out
    assert out["check-errors"] == 0, out
    assert out["rc"] == 0, out
    return out


def qemu_compare(a: str | Path, b: str | Path, fa: str = "qcow2", fb: str = "raw") -> None:
    res = qemu_img("compare", "-f", fa, "-F", fb, str(a), str(b), check=False)
    assert res.returncode == 0, f"images differ: {res.stdout}{res.stderr}"


def to_raw(path: str | Path, out: str | Path) -> bytes:
    qemu_img("convert", "-O", "raw", str(path), str(out))
    return Path(out).read_bytes()


def wait_for_lock(path: str | Path, timeout: float = 30.0) -> None:
    """Wait until some process holds an OFD lock on path, without taking one ourselves."""
    import os
    import time

    inode = os.stat(path).st_ino
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open("/proc/locks") as locks:
            if any(f":{inode} " in line and "OFDLCK" in line for line in locks):
                return
        time.sleep(0.05)
    raise AssertionError(f"nobody locked {path} within {timeout} s")


@pytest.fixture
def qemu() -> None:
    _require()
