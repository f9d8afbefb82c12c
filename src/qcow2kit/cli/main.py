"""Entry point: dispatch `qcow2kit VERB` to cli/<verb>.py and turn failures into exit codes.

Only the errors a user can cause become `qcow2kit: <message>` and a qemu-img exit code: bad
arguments (UsageError, argparse errors: exit 1), Qcow2Error and OSError. Any other exception is
a bug in qcow2kit and is reported as one (exit 70, EX_SOFTWARE), with a traceback only when
QCOW2KIT_DEBUG=1. Never interprets sizes or options itself (cli/common.py does).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ..errors import Qcow2Error
from .common import PROG, UsageError

# qcow2kit never calls BLAS, but numpy's OpenBLAS starts a pool of worker threads when numpy
# is imported; on a busy machine creating (and spinning) them costs a command tens of
# milliseconds. Set before any verb imports numpy; a value the user set is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

VERBS = ("create", "info", "map", "convert", "compare", "resize", "check", "compact", "snapshot", "bitmap",
         "serve", "amend", "measure", "rebase", "commit")
EXIT_USAGE = 1
EXIT_INTERNAL = 70  # sysexits.h EX_SOFTWARE: distinct from every exit code qemu-img uses
DEBUG_ENV = "QCOW2KIT_DEBUG"


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
        print(f"{PROG}: {message}\n{_TRY}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


_TRY = f"Try '{PROG} --help' for more information"


def _unexpected(verb: str, extra: list[str]) -> UsageError:
    """qemu-img's words for arguments left over after parsing."""
    first = extra[0]
    if first.startswith("-") and first != "-":
        return UsageError(f"unrecognized option '{first}'\n{_TRY}")
    if verb == "resize":
        return UsageError(f"Expecting image file name and size\n{_TRY}")
    return UsageError(f"Unexpected argument: {first}\n{_TRY}")


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


def _resize_argv(argv: list[str]) -> list[str]:
    """Like qemu-img, resize takes its last argument as the size before reading options, so a
    relative size such as -2M is never mistaken for an option, with or without `--`."""
    rest = argv[1:]
    if any(a in ("-h", "--help") for a in rest[:-1]) or rest[-1:] in (["-h"], ["--help"]):
        return argv
    if len(rest) < 2:
        raise UsageError(f"Not enough arguments\n{_TRY}")
    size = rest.pop()
    return [argv[0], *rest, size] if "--" in rest else [argv[0], *rest, "--", size]


def _report_bug(exc: BaseException) -> int:
    if os.environ.get(DEBUG_ENV) == "1":
        raise exc
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    print(f"{PROG}: internal error: {text}; please report this bug "
          f"(run with {DEBUG_ENV}=1 for a traceback)", file=sys.stderr)
    return EXIT_INTERNAL


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # a known verb first: only its module is needed (the others are never reached, since
        # argparse dispatches on the first positional); anything else needs the full table
        # (help, or an invalid choice listing every verb)
        parser = build_parser(argv[:1] if argv[:1] and argv[0] in VERBS else VERBS)
        if argv[:1] == ["resize"]:
            argv = _resize_argv(argv)
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise _unexpected(argv[0], extra)
        if not getattr(args, "run", None):
            parser.print_help()
            return EXIT_USAGE
        return int(args.run(args))
    except (UsageError, Qcow2Error) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        name = f" '{exc.filename}'" if exc.filename else ""
        print(f"{PROG}:{name} {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # anything else is a bug in qcow2kit, never a user error
        return _report_bug(exc)


if __name__ == "__main__":
    sys.exit(main())
