"""Power cut after every write of a snapshot create / apply / delete (every prefix, sampled
reorderings and torn writes inside flush epochs, each metadata write lost alone): qemu-img
check finds no corruption and not even a leak, and the image reads wholly as before or wholly
as after the operation: the same snapshot list, the same active disk, every snapshot's disk
the same (all read back by qemu-img)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from qcow2kit.image import Image
from qcow2kit.ops.snapshot import apply_snapshot, create_snapshot, delete_snapshot
from qcow2kit.testing.faults import RecordingStorage, check_crash_states
from tests.helpers import qemu_img, qemu_io

View = tuple[tuple[tuple[str, str], ...], bytes, tuple[bytes, ...]]


def read_view(path: Path | str, scratch: Path) -> View:
    """(snapshot (id, name) list, active disk, each snapshot's disk) as QEMU reads them."""
    info = json.loads(qemu_img("info", "-U", "--output=json", str(path)).stdout)
    snaps = tuple((s["id"], s["name"]) for s in info.get("snapshots", []))
    out = scratch / "view.raw"
    qemu_img("convert", "-U", "-O", "raw", str(path), str(out))
    active = out.read_bytes()
    disks = []
    for ident, _ in snaps:
        qemu_img("convert", "-U", "-l", f"snapshot.id={ident}", "-O", "raw", str(path), str(out))
        disks.append(out.read_bytes())
    return snaps, active, tuple(disks)


def run_crash(tmp_path: Path, img: Path, op: Callable[[Image], object], *,
              max_states: int = 70, samples: int = 3) -> int:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    before = read_view(img, scratch)
    initial = img.read_bytes()
    storage = RecordingStorage.from_file(img)
    with Image(storage, backing=False) as image:
        op(image)
    final = tmp_path / "final.qcow2"
    final.write_bytes(storage.contents())
    after = read_view(final, scratch)
    assert after != before

    def verify(state: str) -> None:
        view = read_view(state, scratch)
        assert view in (before, after), "neither wholly before nor wholly after"

    (tmp_path / "states").mkdir()
    n = check_crash_states(initial, storage.log, tmp_path / "states", verify=verify,
                           reorder_samples=samples, max_states=max_states, drop_one=True,
                           allow_leaks=False)
    assert n >= 6
    return n


def base_image(tmp_path: Path, opts: str = "cluster_size=4096", size: str = "6M") -> Path:
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, str(img), size)
    qemu_io(img, "write -P 1 0 768k", "write -c -P 2 1M 64k", "write -z 2M 64k",
            "write -P 3 4M 8k")
    qemu_img("snapshot", "-c", "q1", str(img))
    qemu_io(img, "write -P 4 256k 128k", "write -P 5 5M 64k")
    return img


@pytest.mark.parametrize("opts", ["cluster_size=4096", "cluster_size=512,refcount_bits=64"])
def test_crash_create(tmp_path: Path, opts: str) -> None:
    img = base_image(tmp_path, opts)
    run_crash(tmp_path, img, lambda im: create_snapshot(im, "ours"))


def test_crash_apply_with_resize(tmp_path: Path) -> None:
    img = base_image(tmp_path)
    qemu_img("resize", str(img), "9M")
    qemu_io(img, "write -P 6 8M 64k", "write -P 7 0 4k")
    run_crash(tmp_path, img, lambda im: apply_snapshot(im, "q1"))


def test_crash_delete(tmp_path: Path) -> None:
    img = base_image(tmp_path, "cluster_size=4096,refcount_bits=8")
    qemu_img("snapshot", "-c", "q2", str(img))
    qemu_io(img, "write -P 8 0 64k")
    run_crash(tmp_path, img, lambda im: delete_snapshot(im, "q1"))


def test_crash_delete_last_returns_copied(tmp_path: Path) -> None:
    """Deleting the only snapshot: every shared cluster returns to refcount 1 and COPIED."""
    img = base_image(tmp_path, "cluster_size=65536,extended_l2=on", size="8M")
    run_crash(tmp_path, img, lambda im: delete_snapshot(im, "1"), max_states=50)


def test_crash_create_grows_the_refcount_table(tmp_path: Path) -> None:
    """512-byte clusters and 64-bit refcounts: one refcount table cluster covers 2 MiB of
    file, so the new state needs a bigger refcount table (and new refcount blocks)."""
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", str(img), "4M")
    qemu_io(img, "write -P 1 0 1950k")
    before = img.read_bytes()
    run_crash(tmp_path, img, lambda im: create_snapshot(im, "grow"), max_states=60)
    assert struct.unpack_from(">I", before, 56)[0] < struct.unpack_from(
        ">I", (tmp_path / "final.qcow2").read_bytes(), 56)[0]


def test_crash_chain_in_one_session(tmp_path: Path) -> None:
    """create, create, apply, delete, delete in one open image: every crash state reads as
    the image between two of the operations (the in-memory state follows each switch)."""
    img = base_image(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    initial = img.read_bytes()
    storage = RecordingStorage.from_file(img)
    views = [read_view(img, scratch)]
    steps: list[Callable[[Image], object]] = [
        lambda im: create_snapshot(im, "a"), lambda im: create_snapshot(im, "b"),
        lambda im: apply_snapshot(im, "q1"), lambda im: delete_snapshot(im, "a"),
        lambda im: delete_snapshot(im, "q1"),
    ]
    state = tmp_path / "step.qcow2"
    with Image(storage, backing=False) as image:
        for step in steps:
            step(image)
            state.write_bytes(storage.contents())
            views.append(read_view(state, scratch))

    def verify(path: str) -> None:
        assert read_view(path, scratch) in views, "not the image between two operations"

    (tmp_path / "states").mkdir()
    n = check_crash_states(initial, storage.log, tmp_path / "states", verify=verify,
                           reorder_samples=2, max_states=80, allow_leaks=False)
    assert n > 20


def test_crash_create_after_lazy_writes(tmp_path: Path) -> None:
    """Lazy refcounts: guest writes in the same session set the dirty bit, then a create;
    every crash state of the create (repaired as QEMU does on open) reads before or after."""
    img = base_image(tmp_path, "cluster_size=4096,lazy_refcounts=on")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    storage = RecordingStorage.from_file(img)
    with Image(storage, backing=False) as image:
        image.write(64 * 1024, b"\x5a" * 300_000)
        image.flush()
        storage.restart()
        mid = tmp_path / "mid.qcow2"
        mid.write_bytes(storage.contents())
        create_snapshot(image, "lazy")
        final = tmp_path / "final.qcow2"
        final.write_bytes(storage.contents())
        log = list(storage.log)
        initial = storage.initial
    for path in (mid, final):  # QEMU repairs the dirty image when it opens it
        qemu_img("check", "-r", "all", str(path))
    views = [read_view(mid, scratch), read_view(final, scratch)]

    def verify(path: str) -> None:
        assert read_view(path, scratch) in views

    (tmp_path / "states").mkdir()
    n = check_crash_states(initial, log, tmp_path / "states", verify=verify,
                           reorder_samples=3, max_states=60)
    assert n >= 6
