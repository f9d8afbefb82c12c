"""Seeded random sequences of guest writes and snapshot create / apply / delete, by qcow2kit
and by qemu-img in turn, against a model (the bytes every snapshot and the active disk must
hold): after every step `qemu-img check` is clean (no leaks) and QEMU reads what the model
says."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from qcow2kit.image import Image
from qcow2kit.ops.snapshot import apply_snapshot, create_snapshot, delete_snapshot
from tests.helpers import assert_clean, qemu_img, stable_seed, to_raw

K = 1024


@pytest.mark.parametrize("opts", ["cluster_size=4096,refcount_bits=4",
                                  "cluster_size=512,extended_l2=off,refcount_bits=32",
                                  "cluster_size=65536,extended_l2=on"])
def test_random_snapshot_sequences(tmp_path: Path, opts: str) -> None:
    rng = random.Random(stable_seed("snapshot-random", opts))
    size = 1536 * K
    p = tmp_path / "r.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", opts, str(p), str(size))
    active = bytearray(size)
    saved: dict[str, bytes] = {}
    counter = 0
    for step in range(40):
        kind = rng.choice(["write", "write", "create", "create", "apply", "delete", "delete"])
        tool = rng.choice(["ours", "qemu"])
        if kind == "write" or (kind in ("apply", "delete") and not saved):
            with Image.open_path(str(p), writable=True) as img:
                for _ in range(rng.randint(1, 4)):
                    off = rng.randrange(0, size - 1)
                    n = min(rng.choice([1, 512, 4096, 70 * K]), size - off)
                    data = bytes([rng.randrange(1, 256)]) * n
                    img.write(off, data)
                    active[off : off + n] = data
        elif kind == "create":
            counter += 1
            name = f"s{counter}"
            if tool == "ours":
                with Image.open_path(str(p), writable=True) as img:
                    create_snapshot(img, name)
            else:
                qemu_img("snapshot", "-c", name, str(p))
            saved[name] = bytes(active)
        else:
            name = rng.choice(sorted(saved))
            if tool == "ours":
                with Image.open_path(str(p), writable=True) as img:
                    (apply_snapshot if kind == "apply" else delete_snapshot)(img, name)
            else:
                qemu_img("snapshot", "-a" if kind == "apply" else "-d", name, str(p))
            if kind == "apply":
                active[:] = saved[name]
            else:
                del saved[name]
        assert_clean(p)
        assert to_raw(p, tmp_path / "x.raw", keep=False) == active, (step, kind, tool)
    for name, data in saved.items():
        assert to_raw(p, tmp_path / "x.raw", snapshot=name, keep=False) == data, name
