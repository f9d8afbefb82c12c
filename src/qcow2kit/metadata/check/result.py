"""What a check reports: `CheckResult` (qemu-img check's numbers, messages and exit code),
the per-pass counters, and the exception that ends a pass early ("Check failed").

Owns no I/O and no checking logic; must never import the other check modules (they all
import this one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

FIX_LEAKS = 1
FIX_ERRORS = 2


@dataclass
class CheckResult:
    """Outcome of a check, with the same numbers qemu-img check reports.

    After a repair, the `*_fixed` counts come from the repairing pass and every other
    number from the non-repairing second pass ("Double checking the fixed image now...").
    `messages` are the per-cluster diagnostics (qemu-img prints them on stderr) of the
    first pass, `recheck_messages` those of the second pass. `error` is set when the
    check could not complete (qemu-img: "Check failed: <error>", exit code 1)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)
    recheck_messages: list[str] = field(default_factory=list)
    rechecked: bool = False
    error: str | None = None

    @property
    def exit_code(self) -> int:
        """qemu-img check's exit code: 0 clean, 1 failed, 2 corruptions, 3 leaks."""
        if self.error is not None or self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0


class CheckFailedError(Exception):
    """The check could not complete (QEMU returns an errno; qemu-img says Check failed)."""


@dataclass
class Counts:
    """The counters one part of a pass accumulates (qemu's BdrvCheckResult)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0


def add_counts(out: CheckResult, c: Counts) -> None:
    out.corruptions += c.corruptions
    out.leaks += c.leaks
    out.check_errors += c.check_errors
    out.corruptions_fixed += c.corruptions_fixed
    out.leaks_fixed += c.leaks_fixed


def hx(value: int) -> str:
    """C's %#x: "0" for zero, else 0x-prefixed hex."""
    return f"0x{value:x}" if value else "0"
