"""The argparse-free command line of `qcow2kit check` (cli/check.py's fast_args): the command
lines it accepts give exactly the namespace argparse gives; anything else (help, a repair
mode argparse would refuse, abbreviations, joined short options, missing values, two files,
...) it declines, and argparse takes over.
"""

from __future__ import annotations

import pytest

# ---- the argparse-free command line -----------------------------------------------------------
ACCEPTED = [
    ["x.qcow2"],
    ["--output=json", "x.qcow2"],
    ["--output", "human", "x.qcow2"],
    ["x.qcow2", "-q"],
    ["-U", "x.qcow2"],
    ["--force-share", "--output=human", "x.qcow2"],
    ["-f", "qcow2", "x.qcow2"],
    ["-f", "raw", "x.qcow2"],
    ["-f", "vmdk", "x.qcow2"],
    ["-q", "-q", "x.qcow2", "--output=json", "--output", "human", "-f", "raw", "-f", "qcow2"],
    ["qcow2"],
    ["-r", "leaks", "x"],
    ["-r", "all", "--output=json", "x"],
    ["x", "-r", "leaks", "-r", "all"],
]
DECLINED = [
    [],
    ["-h"],
    ["--help", "x"],
    ["-r", "none", "x"],
    ["-r"],
    ["-rleaks", "x"],
    ["--out=json", "x"],
    ["--output=JSON", "x"],
    ["-fqcow2", "x"],
    ["-f"],
    ["-f", "-q", "x"],
    ["--output"],
    ["a", "b"],
    ["--", "x"],
    ["-"],
    ["-qU", "x"],
    ["-q"],
]


@pytest.mark.parametrize("rest", ACCEPTED, ids=" ".join)
def test_fast_args_same_as_argparse(rest: list[str]) -> None:
    from qcow2kit.cli import check as cli_check
    from qcow2kit.cli.main import build_parser

    fast = cli_check.fast_args(rest)
    assert fast is not None
    assert vars(fast) == vars(build_parser(["check"]).parse_args(["check", *rest]))


@pytest.mark.parametrize("rest", DECLINED, ids=" ".join)
def test_fast_args_declined(rest: list[str]) -> None:
    from qcow2kit.cli import check as cli_check

    assert cli_check.fast_args(rest) is None
