"""The argparse side of the command line: the parser with qemu-img's reaction to bad
arguments, help laid out at the terminal's width without importing shutil, and the verbs'
subparsers (only the modules of the verbs asked for are imported).

Imported by cli/main.py only when a command line needs argparse; holds no verb's options
(cli/<verb>.py registers its own) and never runs a command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .common import PROG
from .main import DEBUG_ENV, EXIT_INTERNAL, EXIT_USAGE, TRY_HELP, VERBS


def _terminal_columns() -> int:
    """shutil.get_terminal_size().columns, without importing shutil (and through it bz2, lzma,
    fnmatch): argparse builds a formatter for every add_argument, so every command paid for
    that import at start-up. Same sources in the same order: $COLUMNS, the terminal of
    stdout, 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        columns = 80
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's default layout; only the width is found without importing shutil."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         _terminal_columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """argparse with qemu-img's reaction to bad arguments: a one-line message and exit 1
    (argparse's own default is exit 2, which qemu-img uses for 'check found corruption').
    Every subcommand's parser is one too (add_subparsers makes them of the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: {message}\n{TRY_HELP}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser(verbs: Sequence[str] = VERBS) -> argparse.ArgumentParser:
    """The parser; with `verbs`, only those subcommands' modules are imported and registered
    (start-up: `qcow2kit info` should not pay for importing every other verb)."""
    parser = _Parser(
        prog=PROG,
        description="Create, inspect, convert, resize (and shrink), check and compact qcow2 "
        "disk images, compatible with QEMU's qemu-img.",
        epilog=f"Exit codes follow qemu-img; {EXIT_INTERNAL} means an internal error (a bug: "
        f"please report it; {DEBUG_ENV}=1 shows the traceback).",
    )
    # prog given: argparse would otherwise build a help formatter to derive the same
    # "qcow2kit" from the usage line, importing shutil for the terminal width
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", prog=PROG)
    for verb in verbs:
        try:
            module = importlib.import_module(f"qcow2kit.cli.{verb}")
        except ModuleNotFoundError as exc:
            if exc.name == f"qcow2kit.cli.{verb}":
                continue
            raise
        module.register(sub)
    return parser
