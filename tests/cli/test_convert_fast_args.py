"""`convert`'s argparse-free command-line fast path gives exactly argparse's result for the
command lines it accepts and declines everything else; a raw -> qcow2 convert then runs
without argparse, numpy or the image code in the process, and the output is qemu-img's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qcow2kit.cli import convert as cli_convert
from qcow2kit.cli.main import build_parser
from tests.helpers import assert_clean, qemu_compare

ACCEPTED = [
    ["a", "b"],
    ["-f", "raw", "-O", "qcow2", "a", "b"],
    ["-q", "-p", "-c", "-U", "-O", "qcow2", "a", "b"],
    ["a", "-O", "qcow2", "b", "--force-share"],
    ["-o", "cluster_size=4k", "-o", "compression_type=zstd", "-O", "qcow2", "a", "b"],
    ["-S", "0", "-t", "writeback", "-B", "base", "-F", "raw", "a", "b"],
    ["-l", "snapshot.name=x", "a", "b"],
    ["-s", "snap", "-f", "qcow2", "-f", "raw", "a", "b"],
]
DECLINED = [
    [],
    ["a"],
    ["a", "b", "c"],
    ["-h", "a", "b"],
    ["--help"],
    ["-fraw", "a", "b"],
    ["-f", "vmdk", "a", "b"],
    ["-O", "vmdk", "a", "b"],
    ["-t", "none", "a", "b"],
    ["-o", "-x", "a", "b"],
    ["-qc", "a", "b"],
    ["-n", "a", "b"],
    ["a", "b", "-f"],
    ["--", "a", "b"],
    ["-", "b"],
]


@pytest.mark.parametrize("rest", ACCEPTED, ids=" ".join)
def test_same_as_argparse(rest: list[str]) -> None:
    fast = cli_convert.fast_args(rest)
    assert fast is not None
    parsed = build_parser(["convert"]).parse_args(["convert", *rest])
    assert vars(fast) == vars(parsed)


@pytest.mark.parametrize("rest", DECLINED, ids=" ".join)
def test_declined(rest: list[str]) -> None:
    assert cli_convert.fast_args(rest) is None


def test_raw_to_qcow2_imports_no_argparse_no_numpy(tmp_path: Path) -> None:
    src = tmp_path / "a.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(3 << 20))
        f.seek(6 << 20)
        f.write(os.urandom(100_000))
    out = tmp_path / "b.qcow2"
    code = (
        "import sys\n"
        "from qcow2kit.cli.main import main\n"
        "assert main(['convert', '-q', '-O', 'qcow2', sys.argv[1], sys.argv[2]]) == 0\n"
        "for name in ('argparse', 'numpy', 'qcow2kit.image'):\n"
        "    assert name not in sys.modules, name + ' imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert_clean(out)
    qemu_compare(out, src)
