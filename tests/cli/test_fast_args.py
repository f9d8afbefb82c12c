"""`info`'s argparse-free fast path (start-up, issue 16) gives exactly argparse's result for the
command lines it accepts, and declines everything else (argparse then handles it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qcow2kit.cli import info as cli_info
from qcow2kit.cli.main import build_parser

ACCEPTED = [
    ["x.qcow2"],
    ["--output=json", "x.qcow2"],
    ["--output", "human", "x.qcow2"],
    ["x.qcow2", "--output=json"],
    ["-f", "raw", "x.qcow2"],
    ["-f", "qcow2", "--backing-chain", "-U", "x.qcow2"],
    ["--force-share", "--output=human", "x.qcow2"],
    ["-U", "-U", "x.qcow2", "-f", "qcow2", "-f", "raw", "--output", "json", "--output=human"],
    ["qcow2"],
]
DECLINED = [
    [],
    ["-h"],
    ["--help", "x"],
    ["--out=json", "x"],
    ["--output=JSON", "x"],
    ["-fqcow2", "x"],
    ["-f", "vmdk", "x"],
    ["-f"],
    ["--output"],
    ["a", "b"],
    ["--", "x"],
    ["-"],
    ["--backing-chain"],
]


@pytest.mark.parametrize("rest", ACCEPTED, ids=" ".join)
def test_same_as_argparse(rest: list[str]) -> None:
    fast = cli_info.fast_args(rest)
    assert fast is not None
    parsed = build_parser(["info"]).parse_args(["info", *rest])
    assert vars(fast) == vars(parsed)


@pytest.mark.parametrize("rest", DECLINED, ids=" ".join)
def test_declined(rest: list[str]) -> None:
    assert cli_info.fast_args(rest) is None


def test_info_does_not_import_argparse(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    code = (
        "import sys\n"
        "from qcow2kit.cli.main import main\n"
        "assert main(['info', sys.argv[1]]) == 0\n"
        "assert 'argparse' not in sys.modules, 'argparse imported'\n"
        "assert 'numpy' not in sys.modules, 'numpy imported'\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(img)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_program_exits_with_its_output_flushed(tmp_path: Path) -> None:
    """The program ends without the interpreter's teardown (cli.main._exit_now): the output
    must still be complete and the exit code the command's."""
    img = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q 1M 3M", str(img)], check=True)
    for args in (["info", "--output=json", str(img)], ["map", "--output=json", str(img)]):
        ours = subprocess.run([sys.executable, "-m", "qcow2kit", *args], capture_output=True,
                              text=True)
        ref = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
        assert ours.returncode == 0 and ours.stderr == ""
        assert ours.stdout.replace(str(img), "X") == ref.stdout.replace(str(img), "X")
    bad = subprocess.run([sys.executable, "-m", "qcow2kit", "info", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("qcow2kit: ") and bad.stdout == ""


# every verb with a fast path parses through cli/common.plain_command_line: the same lines
# must give argparse's namespace (or be declined) whichever verb asks
EVERY_VERB = [
    ("info", ["-f=qcow2", "--output=json", "x"]),
    ("check", ["--output=human", "-f", "qcow2", "-q", "x"]),
    ("check", ["-f=raw", "x"]),
    ("check", ["-r=all", "--output=json", "x"]),
    ("map", ["--start-offset=64k", "--max-length", "1M", "--output=json", "x"]),
    ("map", ["--no-backing", "-f=raw", "-U", "x"]),
    ("convert", ["-O", "qcow2", "-o", "cluster_size=4k", "-o", "lazy_refcounts=on", "a", "b"]),
    ("convert", ["-f=raw", "-O=qcow2", "-c", "-S", "0", "a", "b"]),
    ("snapshot", ["-l", "x"]),
    ("snapshot", ["-U", "-l", "-q", "x"]),
    ("snapshot", ["--force-share", "x", "-l"]),
    ("snapshot", ["-c", "before-upgrade", "x"]),
    ("snapshot", ["-a", "1", "-q", "x"]),
    ("snapshot", ["-d", "s1", "-d", "s2", "x"]),
    ("snapshot", ["x"]),
]
EVERY_VERB_DECLINED = [
    ("info", ["--output=", "x"]),
    ("check", ["-r", "fix", "x"]),
    ("map", ["--start-offset", "-1", "x"]),
    ("convert", ["a"]),
    ("convert", ["a", "b", "c"]),
    ("convert", ["-O", "vmdk", "a", "b"]),
    ("snapshot", ["-l", "-l", "x"]),
    ("snapshot", ["-l"]),
    ("snapshot", ["-l", "a", "b"]),
    ("snapshot", ["-c", "-x", "a"]),
    ("snapshot", ["-lU", "x"]),
]


@pytest.mark.parametrize(("verb", "rest"), EVERY_VERB, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_fast_path_same_as_argparse(verb: str, rest: list[str]) -> None:
    import importlib

    fast = importlib.import_module(f"qcow2kit.cli.{verb}").fast_args(rest)
    assert fast is not None
    parsed = build_parser([verb]).parse_args([verb, *rest])
    assert vars(fast) == vars(parsed)


@pytest.mark.parametrize(("verb", "rest"), EVERY_VERB_DECLINED,
                         ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_every_fast_path_declines(verb: str, rest: list[str]) -> None:
    import importlib

    assert importlib.import_module(f"qcow2kit.cli.{verb}").fast_args(rest) is None
