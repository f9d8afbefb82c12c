"""The `map` command and its numpy-free fast path (ops/map_plain.py, issue 16):

- the command really takes it: no numpy, no argparse in the process, for the whole disk,
  ranges and images with zero clusters; where the fast path declines it falls back (numpy
  imported) and prints exactly what qemu-img prints;
- its command line is parsed without argparse, into exactly argparse's namespace, and what
  it does not parse it leaves to argparse;
- a locked image gives the same lock error, and -U the same output, with and without it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qcow2kit.cli import map as cli_map
from qcow2kit.cli.main import build_parser, main
from qcow2kit.ops import map_plain
from tests.cli.map_fast_support import FALLBACK
from tests.cli.map_fast_support import images as images  # the module-scoped fixture
from tests.cli.map_fast_support import run as _run
from tests.cli.map_fast_support import written as _written
from tests.helpers import qemu_img, wait_for_lock


@pytest.mark.parametrize("name", [n for n in FALLBACK if n != "missing"])
def test_command_falls_back_to_the_same_answer_as_qemu(images: Callable[[str], Path],
                                                      name: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = str(images(name))
    for extra in (["--output=json"], []):
        rc = main(["map", *extra, path])
        out, err = capsys.readouterr()
        ref = qemu_img("map", *extra, path, check=False)
        assert out == ref.stdout
        assert rc == (0 if ref.returncode == 0 else 1)
        if ref.returncode:
            assert "compressed clusters" in err and "compressed clusters" in ref.stderr


_PROBE = (
    "import sys\n"
    "from qcow2kit.cli.main import main\n"
    "rc = main(sys.argv[1:])\n"
    "sys.stdout.flush()\n"
    "print('numpy' in sys.modules, 'argparse' in sys.modules, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def _probe(*argv: str) -> tuple[str, bool, bool]:
    res = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    numpy, argparse = res.stderr.split()
    return res.stdout, numpy == "True", argparse == "True"


@pytest.mark.parametrize("output", [["--output=json"], ["--output", "human"], []])
def test_command_takes_the_fast_path(images: Callable[[str], Path], output: list[str]) -> None:
    path = str(images("sparse"))
    out, numpy, argparse = _probe("map", *output, path)
    assert not numpy and not argparse
    assert out == qemu_img("map", *output, path).stdout


def test_command_falls_back_with_numpy(images: Callable[[str], Path]) -> None:
    path = str(images("compressed"))
    out, numpy, _ = _probe("map", "--output=json", path)
    assert numpy
    assert out == qemu_img("map", "--output=json", path).stdout


def test_offsets_take_the_fast_path(images: Callable[[str], Path]) -> None:
    path = str(images("sparse"))
    argv = ["--output=json", "--start-offset=300M", "--max-length", "1000k"]
    out, numpy, _ = _probe("map", *argv, path)
    assert not numpy
    assert out == qemu_img("map", *argv, path).stdout


@pytest.mark.parametrize("name", ["zero-unmapped", "zero-mixed-4k", "metadata-prealloc-zeroed"])
def test_command_takes_the_fast_path_with_zero_clusters(images: Callable[[str], Path],
                                                        name: str) -> None:
    path = str(images(name))
    for output in (["--output=json"], []):
        out, numpy, _ = _probe("map", *output, path)
        assert not numpy
        assert out == qemu_img("map", *output, path).stdout


# ---- argument parsing without argparse ------------------------------------------------------
ACCEPTED = [
    ["x.qcow2"],
    ["--output=json", "x.qcow2"],
    ["--output", "human", "-U", "x.qcow2"],
    ["x.qcow2", "--force-share", "-f", "qcow2", "--no-backing"],
    ["-f", "raw", "--start-offset", "1M", "--max-length=2k", "x"],
    ["--start-offset=0x10", "--max-length", "5", "x", "--output=human", "--output=json"],
    ["--start-offset=", "x"],
]
DECLINED = [
    [], ["-h"], ["--help", "x"], ["--out=json", "x"], ["-f", "vmdk", "x"], ["-fqcow2", "x"],
    ["--start-offset", "-1", "x"], ["--start-offset=-1", "x"], ["--start", "1", "x"],
    ["--max-length"], ["a", "b"], ["--", "x"], ["-"], ["--no-backing"],
]


@pytest.mark.parametrize("rest", ACCEPTED, ids=" ".join)
def test_fast_args_same_as_argparse(rest: list[str]) -> None:
    fast = cli_map.fast_args(rest)
    assert fast is not None
    assert vars(fast) == vars(build_parser(["map"]).parse_args(["map", *rest]))


@pytest.mark.parametrize("rest", DECLINED, ids=" ".join)
def test_fast_args_declines(rest: list[str]) -> None:
    assert cli_map.fast_args(rest) is None


# ---- locks: the fast path opens the image as the full path does ----------------------------
def test_locked_image(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    img = _written("16M", "64k", "write -q 0 1M")(tmp_path / "busy.qcow2")
    holder = subprocess.Popen(["qemu-io", str(img)], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lock(img)
        locked = _run(["map", "--output=json", str(img)], capsys)
        assert locked[0] == 1 and 'Failed to get shared "write" lock' in locked[2], locked
        shared = _run(["map", "--output=json", "-U", str(img)], capsys)
        assert shared == (0, qemu_img("map", "--output=json", "-U", str(img)).stdout, "")
        assert not isinstance(map_plain.plain_map(str(img), force_share=True), str)
        monkeypatch.setattr(map_plain, "plain_map", lambda *a, **k: "disabled by the test")
        assert _run(["map", "--output=json", str(img)], capsys) == locked
        assert _run(["map", "--output=json", "-U", str(img)], capsys) == shared
    finally:
        holder.kill()
        holder.wait()
