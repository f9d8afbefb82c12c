"""Shared CLI helpers: size parsing, -o option lists, errors to exit codes."""

from __future__ import annotations

import argparse
import re

_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
           "p": 1 << 50, "e": 1 << 60}


class UsageError(Exception):
    """Bad command-line arguments: printed as 'qcow2kit: ...', exit 1."""


def parse_size(text: str) -> int:
    """'1G', '512M', '1.5G', '65536' -> bytes (qemu-img's suffixes, base 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgtpeBKMGTPE]?)\s*", text)
    if not m:
        raise UsageError(
            f"Invalid image size specified. You may use k, M, G, T, P or E suffixes "
            f"for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes. ({text!r})"
        )
    number, suffix = m.groups()
    value = float(number) * _SUFFIX[suffix.lower()] if "." in number else int(number) * _SUFFIX[
        suffix.lower()]
    return int(value)


def parse_options(items: list[str] | None) -> dict[str, str]:
    """-o key=value,key=value (may be repeated)."""
    out: dict[str, str] = {}
    for item in items or []:
        for part in item.split(","):
            if not part:
                continue
            key, sep, value = part.partition("=")
            out[key.strip()] = value.strip() if sep else "on"
    return out


def parse_bool(key: str, value: str) -> bool:
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise UsageError(f"Parameter '{key}' expects 'on' or 'off'")


def add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", choices=("human", "json"), default="human", help="output format"
    )
