"""The write-path state machine with resize (grow and shrink) and compact mixed in: the model
is truncated or extended with zeros, and QEMU judges the result (qemu-img check clean with no
leaks, qemu-img compare equal to the model, every snapshot still holding its data)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

import qcow2kit
from tests.model.test_state_machine import Config, DiskMachine

CONFIGS = [
    Config(512, 64, "1.1", creator="ours", size=2 << 20),
    Config(4096, 16, "1.1", backing="qcow2", creator="qemu"),
    Config(4096, 16, "0.10", backing="raw", creator="ours"),
    Config(4096, 16, "1.1", start="compressed", size=4 << 20),
    Config(4096, 16, "1.1", start="snapshot"),
    Config(65536, 16, "0.10", start="snapshot", size=8 << 20),
    Config(65536, 64, "1.1", extended_l2=True, creator="qemu", size=8 << 20),
    Config(65536, 16, "1.1", backing="qcow2", creator="qemu", size=8 << 20, lazy=True),
    Config(4096, 16, "1.1", creator="qemu", data_file=True),
    Config(512, 16, "1.1", start="snapshot", tiny_cache=True, size=2 << 20),
]


class ResizeMachine(DiskMachine):
    def _span(self, data: st.DataObject, max_len: int | None = None) -> tuple[int, int]:
        size = self.model.size
        cs = self.cfg.cluster_size
        offset = data.draw(st.integers(0, size - 1), label="offset")
        if data.draw(st.booleans(), label="aligned"):
            offset -= offset % cs
        length = data.draw(st.integers(1, min(4 * cs, 1 << 20)), label="length")
        return offset, max(0, min(length, size - offset))

    @rule(data=st.data())
    def resize(self, data: st.DataObject) -> None:
        cs = self.cfg.cluster_size
        new = data.draw(
            st.sampled_from([cs, 3 * cs + 512, self.cfg.size // 2, self.cfg.size * 2])
            | st.integers(1, 2 * self.cfg.size // 512).map(lambda n: n * 512),
            label="new_size",
        )
        old = self.model.size
        if self.img.snapshots and self.img.header.version < 3:
            with pytest.raises(qcow2kit.ResizeError):
                self.img.resize(new, shrink=True)
            return
        self.img.resize(new, shrink=new < old)
        if new < old:
            del self.model.data[new:]
        else:
            self.model.data.extend(bytes(new - old))
        self.model.size = new

    @rule()
    def compact(self) -> None:
        self.img.compact()


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.id for c in CONFIGS])
def test_resize_state_machine(cfg: Config) -> None:
    name = f"Resize_{cfg.id.replace('-', '_').replace('.', '_')}"
    machine = type(name, (ResizeMachine,), {"cfg": cfg})
    test_case = machine.TestCase
    test_case.settings = settings(
        max_examples=int(os.environ.get("QK_SM_EXAMPLES", "4")),
        stateful_step_count=int(os.environ.get("QK_SM_STEPS", "12")),
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    test_case().runTest()
