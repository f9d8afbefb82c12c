"""Geometry: every piece of index arithmetic derived from cluster_bits, refcount_order and
whether L2 entries are extended. Pure values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from . import constants as C


@dataclass(frozen=True, slots=True)
class Geometry:
    cluster_bits: int
    refcount_order: int = 4
    extended_l2: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entry_bytes(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_bytes

    @property
    def l2_span_bytes(self) -> int:
        """Guest bytes one L2 table (one L1 entry) maps."""
        return self.cluster_size * self.l2_entries

    @property
    def subclusters(self) -> int:
        return C.SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else 1

    @property
    def subcluster_size(self) -> int:
        return self.cluster_size // self.subclusters

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def refcount_max(self) -> int:
        return (1 << self.refcount_bits) - 1

    @property
    def refblock_entries(self) -> int:
        return (self.cluster_size * 8) >> self.refcount_order

    @property
    def reftable_entries_per_cluster(self) -> int:
        return self.cluster_size // 8

    @property
    def compressed_offset_bits(self) -> int:
        return 62 - (self.cluster_bits - 8)

    def l1_entries_for(self, size: int) -> int:
        return -(-size // self.l2_span_bytes)

    def clusters_for(self, nbytes: int) -> int:
        return -(-nbytes // self.cluster_size)

    def align_up(self, nbytes: int) -> int:
        return self.clusters_for(nbytes) << self.cluster_bits

    def encode_compressed(self, host_offset: int, nbytes: int) -> int:
        x = self.compressed_offset_bits
        extra_sectors = ((host_offset + nbytes - 1) >> 9) - (host_offset >> 9)
        return C.OFLAG_COMPRESSED | (extra_sectors << x) | host_offset
