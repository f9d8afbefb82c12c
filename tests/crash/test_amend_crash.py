"""Power cut after every write of `amend -o refcount_bits=N` and `amend -o compat=...` (every
prefix, sampled reorderings and torn writes inside flush epochs, each metadata write lost
alone): qemu-img check finds no corruption (leaks allowed: the new or the old structures
may be left unreferenced), the refcount width is the old or the new one, and the disk reads
exactly as before (all judged by qemu-img)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from qcow2kit.ops.amend import AmendOptions, amend_storage
from qcow2kit.testing.faults import RecordingStorage, check_crash_states
from tests.helpers import qemu_img, qemu_io


def guest(path: Path | str, out: Path) -> bytes:
    qemu_img("convert", "-U", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def width_and_version(path: Path | str) -> tuple[int, int]:
    head = Path(path).read_bytes()[:104]
    version = struct.unpack_from(">I", head, 4)[0]
    order = struct.unpack_from(">I", head, 96)[0] if version >= 3 else 4
    return 1 << order, version


def run_crash(tmp_path: Path, img: Path, options: AmendOptions, *, max_states: int = 60,
              between: tuple[tuple[int, int], ...] = ()) -> int:
    """between: the (width, version) shapes steps may leave on the way."""
    scratch = tmp_path / "view.raw"
    before = guest(img, scratch)
    shapes = {width_and_version(img), *between}
    initial = img.read_bytes()
    rec = RecordingStorage.from_file(img)
    amend_storage(lambda writable: rec, options, backing=False)
    final = tmp_path / "final.qcow2"
    final.write_bytes(rec.contents())
    shapes.add(width_and_version(final))
    assert guest(final, scratch) == before
    (tmp_path / "states").mkdir()

    def verify(state: str) -> None:
        assert width_and_version(state) in shapes
        assert guest(state, scratch) == before

    n = check_crash_states(initial, rec.log, tmp_path / "states", verify=verify,
                           reorder_samples=3, max_states=max_states, drop_one=True)
    assert n >= 6
    return n


def image(tmp_path: Path, opts: str, size: str = "4M") -> Path:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, str(img), size)
    qemu_io(img, "write -P 1 0 300k", "write -z 1M 64k", "write -P 3 2M 8k")
    return img


@pytest.mark.parametrize(("opts", "bits"), [
    ("cluster_size=4096", 64), ("cluster_size=512", 1), ("cluster_size=4096,refcount_bits=64", 8),
])
def test_crash_refcount_bits(tmp_path: Path, opts: str, bits: int) -> None:
    img = image(tmp_path, opts)
    assert run_crash(tmp_path, img, AmendOptions(refcount_bits=bits)) >= 10


def test_crash_refcount_bits_with_snapshot(tmp_path: Path) -> None:
    img = image(tmp_path, "cluster_size=4096")
    qemu_img("snapshot", "-c", "s", str(img))
    qemu_io(img, "write -P 7 0 8k")
    run_crash(tmp_path, img, AmendOptions(refcount_bits=2))


def test_crash_downgrade(tmp_path: Path) -> None:
    img = image(tmp_path, "cluster_size=4096,lazy_refcounts=on")
    run_crash(tmp_path, img, AmendOptions(compat="0.10"))


def test_crash_upgrade_with_new_width(tmp_path: Path) -> None:
    img = image(tmp_path, "cluster_size=4096,compat=0.10")
    n = run_crash(tmp_path, img, AmendOptions(compat="1.1", refcount_bits=32),
                  between=((16, 3),))
    assert n >= 10


def test_crash_upgrade_rewrites_short_snapshot_entries(tmp_path: Path) -> None:
    """A v2 snapshot table without extra data is rewritten (new table, switch) before the
    v3 header: every crash state reads the same disk and is consistent."""
    from dataclasses import replace

    from qcow2kit.image import Image

    img = image(tmp_path, "cluster_size=4096,compat=0.10")
    qemu_img("snapshot", "-c", "old", str(img))
    qemu_io(img, "write -P 9 0 64k")
    with Image.open_path(str(img)) as opened:
        table = b"".join(replace(sn, extra_data=b"").to_bytes() for sn in opened.snapshots)
        offset = opened.header.snapshots_offset
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(table)
    assert run_crash(tmp_path, img, AmendOptions(compat="1.1")) >= 6


def test_crash_downgrade_expands_snapshot_zero_clusters(tmp_path: Path) -> None:
    """Zero clusters inside a snapshot's L2 table (with and without a host cluster) become
    unallocated / zeroed data; every crash state is consistent and reads the same."""
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "4M")
    qemu_io(img, "write -P 1 0 256k", "write -z 2M 64k", "write -P 2 1M 64k", "write -z 1M 64k")
    qemu_img("snapshot", "-c", "s1", str(img))
    qemu_io(img, "write -P 5 1M 64k", "write -P 6 3M 4k")
    assert run_crash(tmp_path, img, AmendOptions(compat="0.10"), max_states=80) >= 6
