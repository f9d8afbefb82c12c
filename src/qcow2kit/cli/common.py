"""Shared CLI helpers: size parsing with qemu-img's grammar and wording, -o option lists,
usage errors. Owns the text the command line prints for bad arguments; never opens an image.

Sizes follow what qemu-img 7.2 accepts (measured, see tests/cli/test_sizes.py):
- a decimal integer, optionally with a fraction ("1.5"), then at most one suffix
  b/k/M/G/T/P/E (case-insensitive, powers of 1024; no suffix means bytes);
- a fraction needs a suffix other than b unless it is zero ("1.5" and "1.5b" are refused,
  "1.0" and "1." are 1); the scaled fraction is rounded to the nearest byte, halves up;
- "0x..." is hexadecimal (no fraction; a suffix works but is deprecated, with a warning);
- leading whitespace and one '+' are allowed; '-' anywhere, exponents and trailing text are not.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: start-up time
if TYPE_CHECKING:  # argparse: only the verbs' register() functions use it, after importing it
    import argparse
    from collections.abc import Mapping

PROG = "qcow2kit"
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
SECTOR = 512

_SUFFIX = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
# C's isspace() set, then an optional '+' (what strtoull skips), then the number. The
# patterns are compiled on first use (re's cache keeps them): compiling costs start-up time
# that commands without sizes (info) should not pay.
_SIZE_RE = (
    r"[ \t\n\v\f\r]*\+?"
    r"(?:0[xX](?P<hex>[0-9a-fA-F]+)|(?P<int>[0-9]+)(?P<frac>\.[0-9]*(?:[eE][+-]?[0-9]+)?)?)"
    r"(?P<suffix>[bBkKmMgGtTpPeE]?)"
)

SIZE_HELP = (
    "Sizes are bytes, or a number with one of the suffixes k, M, G, T, P, E (powers of 1024; "
    "b means bytes); a fraction needs a suffix (1.5G). A size that is not a multiple of 512 "
    "is rounded up to the next one, as qemu-img does."
)


class UsageError(Exception):
    """Bad command-line arguments: printed as 'qcow2kit: ...', exit 1."""


class _SizeSyntaxError(ValueError):
    """Not a size at all (the text does not parse)."""


class _SizeRangeError(ValueError):
    """A well-formed size that does not fit in 64 bits."""


def _size_value(text: str) -> int:
    """The number of bytes text names, 0 <= n < 2**64; raises _SizeSyntaxError / _SizeRangeError."""
    # the usual spelling (digits, then at most a suffix) without importing re: ~3 ms of
    # start-up, which resize --shrink spends before its early discard can begin
    suffix = text[-1:].lower() if text[-1:].isalpha() else ""
    digits = text[: len(text) - len(suffix)]
    if digits.isascii() and digits.isdigit() and (not suffix or suffix in _SUFFIX):
        value = int(digits) << _SUFFIX.get(suffix, 0)
        if value > UINT64_MAX:
            raise _SizeRangeError(text)
        return value
    import re  # here, not at the top: a command given no size never pays for re

    m = re.match(_SIZE_RE, text)
    if m is None or m.end() != len(text):
        raise _SizeSyntaxError(text)
    suffix = m["suffix"].lower()
    shift = _SUFFIX.get(suffix, 0)
    if m["hex"] is not None:
        if suffix:
            print(f"{PROG}: warning: Using a multiplier suffix on hex numbers is deprecated: "
                  f"{text}", file=sys.stderr)
        value = int(m["hex"], 16) << shift
    else:
        whole = int(m["int"])
        frac_text = m["frac"] or ""
        if "e" in frac_text.lower():
            raise _SizeSyntaxError(text)
        # the fraction as a 64-bit binary fixed-point number, taken from its double value;
        # a fraction that rounds to 1.0 wraps to 0 on x86-64 QEMU, so it does here too
        frac = float("0" + frac_text) if len(frac_text) > 1 else 0.0
        fixed = int(frac * 2.0**64) & UINT64_MAX
        if fixed and shift == 0:
            raise _SizeSyntaxError(text)
        scaled = fixed << shift
        value = (whole << shift) + (scaled >> 64) + ((scaled >> 63) & 1)
    if value > UINT64_MAX:
        raise _SizeRangeError(text)
    return value


def parse_size(text: str, what: str = "image size", maximum: int = INT64_MAX) -> int:
    """A size given as a command-line argument ('1G', '1.5k', '65536') -> bytes, exactly as
    written (no rounding); bad text gets qemu-img's "Invalid <what> specified" wording."""
    try:
        value = _size_value(text)
    except _SizeSyntaxError:
        raise UsageError(
            f"Invalid {what} specified. You may use k, M, G, T, P or E suffixes for\n"
            f"{PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        ) from None
    except _SizeRangeError:
        value = maximum + 1
    if value > maximum:
        raise UsageError(f"Invalid {what} specified. Must be between 0 and {maximum}.")
    return value


def parse_option_size(key: str, text: str) -> int:
    """A size given as an option value (-o size=..., resize's SIZE) -> bytes below 2**64,
    with the wording qemu-img uses for option values."""
    try:
        return _size_value(text)
    except _SizeRangeError:
        raise UsageError(f"Value '{text}' is out of range for parameter '{key}'") from None
    except _SizeSyntaxError:
        raise UsageError(
            f"Parameter '{key}' expects a non-negative number below 2^64\n"
            "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
            "and exabytes, respectively."
        ) from None


_NUMBER_RE = r"[ \t\n\v\f\r]*([+-]?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))"


def parse_option_number(key: str, text: str) -> int:
    """A plain number given as an option value (-o refcount_bits=16): decimal, 0x hex or
    0-prefixed octal, as qemu-img reads numbers; a '-' wraps modulo 2**64 there, so here too
    (the value is then refused by the range check of the option)."""
    import re

    m = re.fullmatch(_NUMBER_RE, text)
    if m is None:
        raise UsageError(f"Parameter '{key}' expects a number")
    sign, hexa, octal, dec = m.groups()
    value = int(hexa, 16) if hexa else int(octal, 8) if octal else int(dec)
    if value > UINT64_MAX:
        raise UsageError(f"Value '{text}' is too large for parameter '{key}'")
    return (-value) & UINT64_MAX if sign == "-" else value


def round_to_sector(size: int) -> int:
    """Round a size up to the next multiple of 512, as qemu-img does for image sizes."""
    return -(-size // SECTOR) * SECTOR


def parse_options(items: list[str] | None) -> dict[str, str]:
    """-o key=value,key=value (may be repeated; a later key wins)."""
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


def plain_command_line(rest: list[str], args: SimpleNamespace, positionals: tuple[str, ...],
                       flags: Mapping[str, tuple[str, object]],
                       valued: Mapping[str, tuple[str, tuple[str, ...] | None]],
                       repeated: tuple[str, ...] = ()) -> SimpleNamespace | None:
    """What a verb's argparse parser makes of `rest`, for plain command lines only, else None
    (argparse then handles them: help, abbreviations, errors, anything unusual). Plain means:
    flags spelled out in full; each valued option spelled out in full, its value in the next
    word or after '=', one of its choices (or, without choices, not starting with '-'); and
    exactly as many words not starting with '-' as there are positionals. `args` holds the
    defaults and is filled in; options named in `repeated` collect their values in a list.
    Skipping argparse saves a small command a good part of its start-up."""
    words: list[str] = []
    i = 0
    while i < len(rest):
        token = rest[i]
        key, eq, value = token.partition("=")
        if token in flags:
            setattr(args, *flags[token])
        elif token in valued or (eq and key.startswith("-") and key in valued):
            dest, choices = valued[key if eq else token]
            if not eq:
                if i + 1 == len(rest):
                    return None
                i += 1
                value = rest[i]
            if value not in choices if choices is not None else value.startswith("-"):
                return None
            if dest in repeated:
                setattr(args, dest, [*(getattr(args, dest) or []), value])
            else:
                setattr(args, dest, value)
        elif token.startswith("-") or len(words) == len(positionals):
            return None
        else:
            words.append(token)
        i += 1
    if len(words) != len(positionals):
        return None
    for dest, word in zip(positionals, words, strict=True):
        setattr(args, dest, word)
    return args
