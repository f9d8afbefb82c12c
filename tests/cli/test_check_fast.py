"""The numpy-free fast path of `qcow2kit check` (ops/check_plain.py), differentially: on every
image, `qcow2kit check` (which takes the fast path when it can) prints exactly what the full
check prints and exits with the same code, and for clean images exactly what qemu-img prints.
The fast path really runs for plain clean images (numpy never imported, nor anything else
heavy) and declines, leaving the words to the full check, for corrupt, leaky and unusual ones
(numpy imported); a repair of a clean image takes it too (nothing to repair, qemu-img's
output, the repair's write lock); options, raw and missing files keep their behaviour.

The images and the helpers are in check_fast_support.py; the command line parsed without
argparse is tested in test_check_fast_args.py, the proof itself (run budget, mutated
metadata, header extensions) in test_check_fast_proof.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qcow2kit.ops.check_plain import prove_clean
from tests.cli.check_fast_support import CLEAN, DAMAGED, UNUSUAL, cli, full, make
from tests.helpers import qemu_img


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_images_take_the_fast_path(tmp_path: Path, name: str) -> None:
    path = make(tmp_path, CLEAN, name)
    before = path.read_bytes()
    assert prove_clean(str(path)) is not None
    for output in ("json", "human"):
        rc, out, err, numpy = cli(f"--output={output}", str(path))
        ref = qemu_img("check", f"--output={output}", str(path), check=False)
        assert (rc, out, err) == (ref.returncode, ref.stdout, "") == (0, ref.stdout, "")
        assert (rc, out) == full(path, output)
        assert not numpy, "the fast path did not run"
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_clean_images_fall_back(tmp_path: Path, name: str) -> None:
    path = make(tmp_path, UNUSUAL, name)
    assert prove_clean(str(path)) is None
    rc, out, err, numpy = cli("--output=json", str(path))
    ref = qemu_img("check", "--output=json", str(path), check=False)
    assert (rc, out) == (ref.returncode, ref.stdout) == full(path, "json")
    assert numpy, "the full check did not run"


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_images_fall_back_to_the_full_report(tmp_path: Path, name: str) -> None:
    path = make(tmp_path, DAMAGED, name)
    before = path.read_bytes()
    assert prove_clean(str(path)) is None
    ref = qemu_img("check", str(path), check=False)
    assert ref.returncode != 0 or "dirty" in name or "corrupt" in name  # broken for QEMU too
    for output in ("json", "human"):
        rc, out, _err, numpy = cli(f"--output={output}", str(path))
        assert (rc, out) == full(path, output)
        assert numpy, "the full check did not run"
    assert path.read_bytes() == before


def test_damage_is_reported_like_qemu(tmp_path: Path) -> None:
    """The fallback's words reach the user: stdout and diagnostics as qemu-img's."""
    path = make(tmp_path, DAMAGED, "l2_copied_cleared")
    rc, out, err, _numpy = cli(str(path))
    ref = qemu_img("check", str(path), check=False)
    assert (rc, out) == (ref.returncode, ref.stdout) == (2, ref.stdout)
    assert err.splitlines() == ref.stderr.splitlines()


@pytest.mark.parametrize(
    "args", [["-q"], ["-q", "--output=json"], ["-f", "qcow2"], ["-U"], ["--force-share", "--output=json"]]
)
def test_options_on_the_fast_path(tmp_path: Path, args: list[str]) -> None:
    path = make(tmp_path, CLEAN, "sparse")
    rc, out, err, numpy = cli(*args, str(path))
    ref = qemu_img("check", *args, str(path), check=False)
    assert (rc, out, err) == (ref.returncode, ref.stdout, "")
    assert not numpy


def test_raw_and_missing_files_keep_their_errors(tmp_path: Path) -> None:
    raw = tmp_path / "x.raw"
    raw.write_bytes(bytes(65536))
    assert cli(str(raw))[:3] == (63, "", "qcow2kit: This image format does not support checks")
    assert cli("-f", "qcow2", str(raw))[0] == 63
    rc, out, err, _ = cli(str(tmp_path / "nope.qcow2"))
    assert (rc, out) == (1, "") and "No such file or directory" in err


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_repair_of_a_clean_image_takes_the_fast_path(tmp_path: Path, mode: str) -> None:
    """A clean image has nothing to repair: qemu-img prints what its check prints, and so
    does the fast path, without writing a byte."""
    path = make(tmp_path, CLEAN, "sparse")
    before = path.read_bytes()
    for output in ("human", "json"):
        rc, out, err, numpy = cli("-r", mode, f"--output={output}", str(path))
        ref = qemu_img("check", "-r", mode, f"--output={output}", str(path), check=False)
        assert (rc, out, err) == (ref.returncode, ref.stdout, "")
        assert not numpy, "the fast path did not run"
    assert path.read_bytes() == before


def test_repair_of_a_damaged_image_takes_the_full_path(tmp_path: Path) -> None:
    path = make(tmp_path, DAMAGED, "l2_copied_cleared")
    rc, out, _err, numpy = cli("-r", "all", str(path))
    assert numpy and rc == 0 and "repaired" in out.lower()
    assert prove_clean(str(path)) is not None  # the full repair left it clean


def test_repair_of_an_image_in_use_is_refused(tmp_path: Path) -> None:
    """The fast path takes the repair's write lock: an image another process holds is
    refused with the full path's words, even when it is clean."""
    from qcow2kit.io.file import FileStorage

    path = make(tmp_path, CLEAN, "sparse")
    holder = FileStorage(str(path), True)
    try:
        rc, _out, err, _numpy = cli("-r", "leaks", str(path))
    finally:
        holder.close()
    assert rc != 0 and "Failed to get" in err


def test_fast_path_imports_nothing_heavy(tmp_path: Path) -> None:
    path = make(tmp_path, CLEAN, "sparse")
    code = (
        "import sys\n"
        "from qcow2kit.cli.main import main\n"
        "assert main(['check', '--output=json', sys.argv[1]]) == 0\n"
        "heavy = {'numpy', 'argparse', 'json', 'qcow2kit.image', 'qcow2kit.metadata.meta',\n"
        "         'qcow2kit.metadata.check', 'qcow2kit.chain'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
