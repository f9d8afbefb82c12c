"""`qcow2kit check` command line: output, exit codes and options, against qemu-img check."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qcow2kit.cli.main import main
from tests.conftest import QEMU_IO, qemu_img
from tests.interop.check_cases import make_case


def ours(*args: str) -> subprocess.CompletedProcess[str]:
    """qcow2kit check in this process (argparse exits become return codes)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(["check", *args])
        except SystemExit as exc:
            rc = int(exc.code or 0)
    return subprocess.CompletedProcess([], rc, out.getvalue(), err.getvalue())


def ours_process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qcow2kit", "check", *args],
                          capture_output=True, text=True)


def theirs(*args: str) -> subprocess.CompletedProcess[str]:
    return qemu_img("check", *args, check=False)


def _diag(text: str) -> list[str]:
    return [x for x in text.splitlines() if x and not x.startswith(("qemu-img:", "qcow2kit:"))]


@pytest.mark.parametrize(
    ("case", "rc"),
    [("clean", 0), ("zero_refcount_data", 2), ("leak_appended", 3), ("refblock_unaligned", 1)],
)
def test_exit_codes_and_human_output(tmp_path: Path, case: str, rc: int) -> None:
    path = make_case(tmp_path, case)
    o, q = ours(str(path)), theirs(str(path))
    assert o.returncode == q.returncode == rc
    assert o.stdout == q.stdout
    assert _diag(o.stderr) == _diag(q.stderr)


def test_raw_has_no_checks(tmp_path: Path) -> None:
    raw = tmp_path / "x.raw"
    raw.write_bytes(b"\0" * 65536)
    o = ours(str(raw))
    assert o.returncode == 63 == theirs(str(raw)).returncode
    assert "does not support checks" in o.stderr
    o = ours("-f", "raw", str(raw))
    assert o.returncode == 63


@pytest.mark.parametrize("output", ["human", "json"])
def test_quiet(tmp_path: Path, output: str) -> None:
    path = make_case(tmp_path, "zero_refcount_data")
    o = ours("-q", f"--output={output}", str(path))
    q = theirs("-q", f"--output={output}", str(path))
    assert o.returncode == q.returncode == 2
    assert o.stdout == q.stdout == ""
    assert _diag(o.stderr) == _diag(q.stderr) != []


@pytest.mark.parametrize(("case", "mode"), [("leak_appended", "leaks"), ("zero_refcount_data", "all"),
                                            ("copied_cleared_l2", "all"), ("clean", "all")])
def test_repair_human_output(tmp_path: Path, case: str, mode: str) -> None:
    a = make_case(tmp_path, case)
    b = tmp_path / "b.qcow2"
    shutil.copy(a, b)
    q = theirs("-r", mode, str(b))
    o = ours("-r", mode, str(a))
    assert o.returncode == q.returncode == 0
    assert o.stdout == q.stdout
    assert _diag(o.stderr) == _diag(q.stderr)
    if case != "clean":
        assert "Double checking the fixed image now..." in o.stdout


def test_repair_json_has_fixed_counts(tmp_path: Path) -> None:
    path = make_case(tmp_path, "leak_appended")
    o = ours("-r", "leaks", "--output=json", str(path))
    data = json.loads(o.stdout)
    assert o.returncode == 0
    assert data["leaks-fixed"] == 2 and "leaks" not in data
    assert data["filename"] == str(path) and data["format"] == "qcow2"


def test_need_rebuild_fails_with_leaks_mode(tmp_path: Path) -> None:
    path = make_case(tmp_path, "zero_refcount_data")
    before = path.read_bytes()
    o = ours("-r", "leaks", str(path))
    assert o.returncode == 1 == theirs("-r", "leaks", str(path)).returncode
    assert o.stdout == ""
    assert "ERROR need to rebuild refcount structures" in o.stderr
    assert "Check failed" in o.stderr
    assert path.read_bytes() == before


def test_in_process_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_case(tmp_path, "clean")
    assert main(["check", "--output=json", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["check-errors"] == 0 and out["image-end-offset"] > 0


def test_missing_file(tmp_path: Path) -> None:
    o = ours_process(str(tmp_path / "nope.qcow2"))
    assert o.returncode == 1
    assert "qcow2kit:" in o.stderr and "Traceback" not in o.stderr


def test_real_process(tmp_path: Path) -> None:
    path = make_case(tmp_path, "leak_appended")
    o, q = ours_process(str(path)), theirs(str(path))
    assert o.returncode == q.returncode == 3
    assert o.stdout == q.stdout


def test_bad_repair_mode() -> None:
    o = ours("-r", "bogus", "x")
    assert o.returncode == 1  # a usage error, as qemu-img (argparse alone would exit 2)


def test_lock_and_force_share(tmp_path: Path) -> None:
    path = make_case(tmp_path, "clean")
    assert QEMU_IO is not None
    holder = subprocess.Popen([QEMU_IO, "-f", "qcow2", str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # wait without taking locks ourselves: a probing qemu-img would race qemu-io's start
        inode = os.stat(path).st_ino
        deadline = time.time() + 30
        while time.time() < deadline:
            with open("/proc/locks") as locks:
                if any(f":{inode} " in line and "OFDLCK" in line for line in locks):
                    break
            time.sleep(0.05)
        q = theirs(str(path))
        o = ours(str(path))
        assert q.returncode == 1 and o.returncode == 1
        assert "lock" in o.stderr
        o = ours("-U", str(path))
        assert o.returncode == 0 == theirs("-U", str(path)).returncode
        assert o.stdout == theirs("-U", str(path)).stdout
        assert ours("-U", "-r", "leaks", str(path)).returncode == 1
    finally:
        holder.communicate(b"quit\n", timeout=10)
