"""Hypothesis state machine: random write / write_zeroes / discard / flush / reopen sequences
against a bytearray model, across cluster sizes (512 B to 2 MiB), refcount widths (1, 16, 64),
compat 0.10 and 1.1, extended L2, lazy refcounts, raw and qcow2 backing files (shorter than the
overlay), external data files (raw or not), images made by qemu-img and by qcow2kit.create,
starting empty, from compressed clusters (zlib, zstd) or with an internal snapshot, with tiny
metadata caches (constant eviction) and with disk sizes that end inside a cluster.

After every step the image must read what the model holds (around the last change and at
seeded places); after each run QEMU is the judge: `qemu-img check --output=json` finds no
corruption and no leak, `qemu-img compare` finds the image equal to the model, snapshots still
hold their data, and QEMU can still write to the image cleanly (tests/model/machine.py). The
last tests here show that the invariant and the teardown do fail when the image is wrong.

QK_SM_EXAMPLES / QK_SM_STEPS raise the number of runs and steps per configuration for a
longer hunt."""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import refcounts_of
from tests.model.machine import Config, DiskMachine, run_machine

CONFIGS = [
    Config(512, 16, "1.1", creator="qemu", size=4 << 20),
    Config(512, 64, "1.1", creator="ours", size=4 << 20),
    Config(512, 1, "1.1", backing="qcow2", creator="qemu", size=4 << 20),
    Config(512, 16, "0.10", backing="raw", creator="ours", size=4 << 20),
    Config(4096, 1, "1.1", creator="qemu"),
    Config(4096, 16, "0.10", creator="qemu"),
    Config(4096, 64, "1.1", backing="raw", creator="ours"),
    Config(4096, 16, "0.10", backing="qcow2", creator="qemu"),
    Config(65536, 16, "1.1", creator="ours", size=8 << 20),
    Config(65536, 64, "1.1", extended_l2=True, creator="qemu", size=8 << 20),
    Config(65536, 1, "1.1", extended_l2=True, backing="qcow2", creator="ours", size=8 << 20),
    Config(65536, 16, "0.10", backing="raw", creator="qemu", size=8 << 20),
    Config(65536, 16, "1.1", backing="qcow2", creator="qemu", size=8 << 20, lazy=True),
    Config(32768, 16, "1.1", extended_l2=True, creator="ours", size=8 << 20, lazy=True),
    Config(2 << 20, 16, "1.1", creator="qemu", size=16 << 20),
    Config(2 << 20, 64, "1.1", extended_l2=True, backing="raw", creator="ours", size=16 << 20),
    Config(2 << 20, 1, "1.1", creator="ours", size=16 << 20),
    Config(2 << 20, 16, "0.10", backing="qcow2", creator="qemu", size=16 << 20),
    Config(4096, 16, "1.1", creator="qemu", data_file=True),
    Config(65536, 16, "1.1", extended_l2=True, creator="ours", data_file=True, size=8 << 20),
    Config(4096, 16, "1.1", backing="raw", creator="ours", data_file=True),
    Config(4096, 16, "1.1", start="compressed", size=4 << 20),
    Config(65536, 64, "1.1", extended_l2=True, start="compressed", size=8 << 20),
    Config(512, 16, "0.10", start="compressed", size=4 << 20),
    Config(4096, 16, "1.1", start="snapshot"),
    Config(65536, 16, "0.10", start="snapshot", size=8 << 20),
    Config(32768, 64, "1.1", extended_l2=True, start="snapshot", backing="qcow2", size=8 << 20),
    Config(512, 16, "1.1", start="snapshot", tiny_cache=True, size=4 << 20),
    Config(4096, 64, "1.1", backing="qcow2", tiny_cache=True),
    Config(16384, 16, "1.1", extended_l2=True, tiny_cache=True, start="compressed"),
    Config(4096, 16, "1.1", start="compressed", zstd=True, size=4 << 20),
    Config(4096, 16, "1.1", creator="qemu", data_file=True, data_file_raw=True),
    Config(65536, 16, "1.1", creator="ours", data_file=True, data_file_raw=True, size=(4 << 20) + 1536),
    # virtual sizes that end inside a cluster (and inside a subcluster)
    Config(65536, 16, "1.1", backing="qcow2", creator="qemu", size=(8 << 20) + 3584),
    Config(65536, 16, "0.10", creator="ours", size=(8 << 20) + 512),
    Config(65536, 16, "1.1", extended_l2=True, backing="raw", creator="ours", size=(8 << 20) + 2560),
    Config(2 << 20, 16, "1.1", start="snapshot", size=(8 << 20) + 4096),
]



@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.id for c in CONFIGS])
def test_state_machine(cfg: Config) -> None:
    run_machine(DiskMachine, cfg, examples=5, steps=15)


# ---- the judges can fail --------------------------------------------------------------------
def _machine(cfg: Config) -> DiskMachine:
    return type("Probe", (DiskMachine,), {"cfg": cfg})()


def test_invariant_catches_a_write_the_model_missed() -> None:
    machine = _machine(Config(4096, size=1 << 20))
    try:
        machine.img.write(5000, b"\xaa" * 100)  # not mirrored in the model
        machine.touched = (5000, 100)
        with pytest.raises(AssertionError, match="guest byte 0x1388 reads 0xaa"):
            machine.reads_match_model()
    finally:
        machine.img.close()
        shutil.rmtree(machine.dir, ignore_errors=True)


def test_teardown_catches_data_that_differs() -> None:
    machine = _machine(Config(4096, size=1 << 20))
    machine.model.write(3 << 16, b"\x01")  # the image never got this byte
    with pytest.raises(AssertionError, match="differ"):
        machine.teardown()


def test_teardown_catches_a_leak() -> None:
    machine = _machine(Config(4096, size=1 << 20, creator="ours"))
    refcounts_of(machine.img).allocate(1)  # counted, referenced by nothing
    with pytest.raises(AssertionError, match="'leaks': 1"):
        machine.teardown()
