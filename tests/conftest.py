"""pytest configuration. The shared helpers live in tests/helpers.py: import them from there.

The names below are re-exported only for modules that still import them from here."""

from __future__ import annotations

import pytest

from tests.helpers import (  # noqa: F401 - re-exported
    QEMU_IMG,
    QEMU_IO,
    assert_clean,
    qemu_check,
    qemu_compare,
    qemu_img,
    qemu_io,
    require_qemu,
    to_raw,
    wait_for_lock,
)


@pytest.fixture
def qemu() -> None:
    require_qemu()
