"""Fuzz: qemu-made images, mutated, through every public operation.

Contract (tests/fuzz/harness.py): each operation succeeds or raises qcow2kit.Qcow2Error;
read-only operations leave every file unchanged (hash + mtime); nothing hangs.

The budget is bounded for the normal test run (about a minute in all); set
QCOW2KIT_FUZZ_EXAMPLES to change the number of examples per test, or use fuzz/long_run.py
for nightly runs with random seeds.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcow2kit
from qcow2kit.format.header import Header
from tests.fuzz import harness as H

EXAMPLES = int(os.environ.get("QCOW2KIT_FUZZ_EXAMPLES", "700"))

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,  # the same inputs on every run: CI stays reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

mutation = st.tuples(
    st.integers(0, 255),
    st.integers(0, 1 << 16),
    st.integers(0, 1 << 32),
    st.integers(0, H.N_OPS - 1),
    st.integers(0, (1 << 64) - 1),
)
mutations = st.lists(mutation, min_size=1, max_size=4)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[H.Seed]:
    return H.build_seeds(tmp_path_factory.mktemp("seeds"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A RAM-backed directory where there is one: writes end in fdatasync, and the budget
    is better spent on inputs than on the disk."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="qcow2kit-fuzz-", dir="/dev/shm"))
        yield d / "w"
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("fuzz") / "w"


def test_seeds_pass_every_operation(seeds: list[H.Seed], work: Path) -> None:
    """Unmutated, every seed opens, reads and takes writes: the harness reaches the deep
    paths, and a mutation that fails is the mutation's doing."""
    names = set()
    for seed in seeds:
        outcome = H.run_input(work, seed, seed.image)
        refused = {k for k, ok in outcome.items() if not ok}
        # refusals made on purpose: no resize of a v2 image with snapshots (qemu-img refuses
        # too), no resize or compact of an image with bitmaps (left to qemu-img)
        allowed = {"v2-512-snap": {"resize"}, "bitmap": {"resize", "compact"}}.get(seed.name, set())
        assert refused <= allowed, (seed.name, outcome)
        names.add(seed.name)
        kinds = {r.kind for r in seed.regions}
        assert {"header", "l1", "l2", "reftable", "refblock"} <= kinds, (seed.name, kinds)
    assert names == set(H.SEED_NAMES)
    compressed = [s for s in seeds if s.name.startswith("compressed")]
    assert all(any(r.kind == "compressed" for r in s.regions) for s in compressed)
    assert any(r.kind == "snapshot" for s in seeds for r in s.regions)
    assert any(r.kind == "bitmaps-ext" for s in seeds for r in s.regions)


def test_harness_catches_a_contract_violation(seeds: list[H.Seed], work: Path) -> None:
    """The oracle must be able to fail: a write to the file during a read-only pass, and a
    non-Qcow2Error exception, are both reported."""
    seed = seeds[0]
    with pytest.raises(H.FuzzFailure):
        H.guard("demo", lambda: int("not a number"))
    assert H.guard("demo", lambda: (_ for _ in ()).throw(qcow2kit.FormatError("x"))) is False
    path = work.parent / "touch.qcow2"
    path.write_bytes(seed.image)
    before = H.file_state(path)
    with qcow2kit.open(str(path), "r+") as img:
        img.write(0, b"x")
    assert H.file_state(path) != before


@pytest.mark.slow
@FUZZ_SETTINGS
@given(seed_index=st.integers(0, len(H.SEED_NAMES) - 1), muts=mutations, rnd=st.integers(0, 1 << 32))
def test_mutated_images(seeds: list[H.Seed], work: Path, seed_index: int, muts: list[H.Mutation],
                        rnd: int) -> None:
    seed = seeds[seed_index]
    H.run_input(work, seed, H.mutate(seed, muts), rnd)


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=max(50, EXAMPLES // 3))
@given(seed_index=st.integers(0, len(H.SEED_NAMES) - 1),
       blob=st.binary(min_size=1, max_size=64), where=st.integers(0, 1 << 32),
       kind_sel=st.integers(0, 255))
def test_random_bytes_in_metadata(seeds: list[H.Seed], work: Path, seed_index: int, blob: bytes,
                                  where: int, kind_sel: int) -> None:
    """Overwrite a run of random bytes inside a metadata structure (or anywhere in cluster 0)."""
    seed = seeds[seed_index]
    meta = [r for r in seed.regions if r.kind not in ("file", "compressed")]
    region = meta[kind_sel % len(meta)]
    span = max(1, region.count * max(region.stride, region.width, 1))
    off = region.offset + where % span
    buf = bytearray(seed.image)
    buf[off : off + len(blob)] = blob[: max(0, len(buf) - off)]
    H.run_input(work, seed, bytes(buf[: len(seed.image)]), where)


_V3 = struct.Struct(">IIQIIQIIQQIIQQQQII")


@settings(FUZZ_SETTINGS, max_examples=max(100, EXAMPLES))
@given(
    fields=st.tuples(
        st.sampled_from([2, 3, 4, 0]),
        st.integers(0, 1 << 64 - 1) | st.sampled_from([0, 72, 104, 112, 512, 4096]),
        st.integers(0, (1 << 32) - 1) | st.sampled_from([0, 5, 1023, 1024]),
        st.integers(0, 40) | st.integers(0, (1 << 32) - 1),
        st.integers(0, (1 << 64) - 1) | st.sampled_from([0, 1 << 20, 1 << 63]),
        st.integers(0, 3),
        st.integers(0, (1 << 32) - 1) | st.integers(0, 8),
        st.integers(0, (1 << 64) - 1) | st.sampled_from([0, 512, 4096, 65536]),
        st.integers(0, (1 << 64) - 1) | st.sampled_from([0, 512, 4096, 65536]),
        st.integers(0, (1 << 32) - 1) | st.integers(0, 4),
        st.integers(0, (1 << 32) - 1) | st.integers(0, 4),
        st.integers(0, (1 << 64) - 1) | st.sampled_from([0, 4096]),
        st.integers(0, (1 << 64) - 1) | st.integers(0, 31),
        st.integers(0, (1 << 64) - 1),
        st.integers(0, (1 << 64) - 1) | st.integers(0, 3),
        st.integers(0, (1 << 32) - 1) | st.integers(0, 7),
        st.integers(0, (1 << 32) - 1) | st.sampled_from([72, 104, 112, 120, 4096]),
    ),
    tail=st.binary(max_size=600),
)
def test_header_codec(fields: tuple[int, ...], tail: bytes) -> None:
    """Header.from_bytes on arbitrary field values: a Header or a Qcow2Error, nothing else,
    and a decoded header re-encodes to bytes that decode to the same header."""
    buf = _V3.pack(0x514649FB, *fields) + tail
    try:
        header = Header.from_bytes(buf)
    except qcow2kit.Qcow2Error:
        return
    again = Header.from_bytes(header.to_bytes() + bytes(4096))
    assert again.size == header.size and again.l1_size == header.l1_size
    assert again.extensions == header.extensions
