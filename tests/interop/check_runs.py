"""Running `qemu-img check` and `qcow2kit check` on one file, for test_check.py and
test_repair.py: the exit code, the JSON (without the file name), the per-cluster diagnostics
on stderr (without the program-prefixed lines) and stdout of each, as a Run.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from qcow2kit.cli.main import main
from tests.conftest import qemu_img


@dataclass
class Run:
    rc: int
    json: dict[str, object] | None
    stderr: list[str]
    stdout: str


def _diag(stderr: str) -> list[str]:
    """Per-cluster diagnostics, without the program-prefixed lines."""
    return [
        line
        for line in stderr.splitlines()
        if line and not line.startswith(("qemu-img:", "qcow2kit:", "qcow2: "))
    ]


def run_qemu(path: Path, *args: str) -> Run:
    res = qemu_img("check", *args, str(path), check=False)
    return _parse(res)


def run_ours(path: Path, *args: str) -> Run:
    """`qcow2kit check ARGS PATH`, run in this process (a fresh interpreter per call would
    cost more than the check itself)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["check", *args, str(path)])
    return _parse(subprocess.CompletedProcess([], rc, out.getvalue(), err.getvalue()))


def run_ours_process(path: Path, *args: str) -> Run:
    res = subprocess.run(
        [sys.executable, "-m", "qcow2kit", "check", *args, str(path)],
        capture_output=True, text=True,
    )
    return _parse(res)


def _parse(res: subprocess.CompletedProcess[str]) -> Run:
    data = None
    if res.stdout.lstrip().startswith("{"):
        data = json.loads(res.stdout)
        data.pop("filename", None)
    return Run(res.returncode, data, _diag(res.stderr), res.stdout)
