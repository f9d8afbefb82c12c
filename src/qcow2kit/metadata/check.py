"""Consistency check and repair (placeholder until the check issue lands)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedFeatureError
from .meta import Metadata


@dataclass
class CheckResult:
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


def check_image(meta: Metadata, repair: str | None = None) -> CheckResult:
    raise UnsupportedFeatureError("check is not implemented yet")
