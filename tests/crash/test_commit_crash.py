"""Power cut after every write of the overlay's emptying at the end of `commit` (QEMU's
make_completely_empty: every prefix, sampled reorderings and torn writes, each metadata
write lost alone): every state is a clean image, or a dirty one that `qemu-img check -r all`
repairs to clean, and the overlay's disk (through its backing file, which already holds the
committed data) reads the same as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qcow2kit.ops.commit import make_completely_empty
from qcow2kit.testing.faults import RecordingStorage, check_crash_states
from tests.helpers import qemu_img, qemu_io


@pytest.mark.parametrize("opts", ["cluster_size=4096", "cluster_size=512,refcount_bits=64",
                                  "cluster_size=65536,lazy_refcounts=on"])
def test_crash_make_completely_empty(tmp_path: Path, opts: str) -> None:
    states = tmp_path / "states"
    states.mkdir()
    base = states / "base.qcow2"
    qemu_img("create", "-f", "qcow2", str(base), "4M")
    qemu_io(base, "write -P 1 0 4M")
    (tmp_path / "base.qcow2").symlink_to(base)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", "-o", opts, str(top))
    qemu_io(top, "write -P 1 0 1M", "write -P 1 3M 100k")  # what commit left: base == view
    view = tmp_path / "view.raw"
    qemu_img("convert", "-O", "raw", str(top), str(view))
    before = view.read_bytes()
    rec = RecordingStorage.from_file(top)
    make_completely_empty(rec)
    final = tmp_path / "final.qcow2"
    final.write_bytes(rec.contents())
    assert all(e["depth"] == 1 for e in json.loads(qemu_img(
        "map", "--output=json", str(final)).stdout))  # emptied: everything from the base

    def verify(state: str) -> None:
        qemu_img("convert", "-O", "raw", state, str(view))
        assert view.read_bytes() == before

    n = check_crash_states(top.read_bytes(), rec.log, states, verify=verify,
                           reorder_samples=3, max_states=60, drop_one=True)
    assert n >= 6
