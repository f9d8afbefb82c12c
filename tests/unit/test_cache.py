"""metadata.cache.TableCache: a bounded LRU of tables with a dirty set. The owner's load and
store callbacks are recorded here, so every test sees exactly which tables were read and
written back, and when."""

from __future__ import annotations

import pytest

from qcow2kit.metadata.cache import TableCache


class Owner:
    """Tables are lists; load makes [key], store records (key, copy of the table)."""

    def __init__(self, fail_store_of: int | None = None) -> None:
        self.loads: list[int] = []
        self.stores: list[tuple[int, list[int]]] = []
        self.fail_store_of = fail_store_of

    def load(self, key: int) -> list[int]:
        self.loads.append(key)
        return [key]

    def store(self, key: int, table: list[int]) -> None:
        if key == self.fail_store_of:
            raise OSError(5, "injected")
        self.stores.append((key, list(table)))

    def cache(self, capacity: int) -> TableCache[list[int]]:
        return TableCache(capacity, self.load, self.store)


def test_get_loads_once_and_returns_the_same_table() -> None:
    o = Owner()
    c = o.cache(4)
    t = c.get(7)
    assert t == [7] and c.get(7) is t
    assert o.loads == [7]
    assert 7 in c and 8 not in c


def test_capacity_is_at_least_two() -> None:
    o = Owner()
    c = o.cache(0)
    assert c.capacity == 2
    c.get(1)
    c.get(2)
    assert 1 in c and 2 in c
    c.get(3)
    assert 1 not in c and 2 in c and 3 in c


def test_least_recently_used_is_evicted() -> None:
    o = Owner()
    c = o.cache(3)
    for key in (1, 2, 3):
        c.get(key)
    c.get(1)  # 2 is now the least recently used
    c.get(4)
    assert [k in c for k in (1, 2, 3, 4)] == [True, False, True, True]
    c.put(5, [50], dirty=False)  # put counts as a use too: 3 goes
    assert 3 not in c and 5 in c
    c.get(2)  # evicted tables are loaded again
    assert o.loads == [1, 2, 3, 4, 2]
    assert o.stores == []  # nothing was dirty


def test_evicting_a_dirty_table_writes_it_back_first() -> None:
    o = Owner()
    c = o.cache(2)
    t = c.get(1)
    t.append(99)
    c.mark_dirty(1)
    c.get(2)
    assert o.stores == []
    c.get(3)  # evicts 1, which is dirty
    assert o.stores == [(1, [1, 99])]
    assert c.dirty == set()
    c.get(4)  # evicts 2, clean: no write
    assert o.stores == [(1, [1, 99])]


def test_put_and_mark_dirty() -> None:
    o = Owner()
    c = o.cache(8)
    c.put(3, [30], dirty=True)
    c.put(4, [40], dirty=False)
    assert c.dirty == {3}
    assert c.get(4) == [40] and o.loads == []  # put tables are not loaded again
    c.mark_dirty(4)
    assert c.dirty == {3, 4}
    with pytest.raises(KeyError):
        c.mark_dirty(5)  # only a cached table can be dirty


def test_write_dirty_writes_in_key_order_once() -> None:
    o = Owner()
    c = o.cache(8)
    for key in (5, 1, 9, 3):
        c.put(key, [key * 10], dirty=True)
    c.put(2, [20], dirty=False)
    assert c.write_dirty() is True
    assert [k for k, _ in o.stores] == [1, 3, 5, 9]
    assert c.dirty == set()
    assert c.write_dirty() is False
    assert len(o.stores) == 4
    assert all(k in c for k in (1, 2, 3, 5, 9))  # writing back keeps the tables cached


def test_a_failed_write_back_keeps_the_tables_dirty() -> None:
    o = Owner(fail_store_of=5)
    c = o.cache(8)
    for key in (1, 5, 9):
        c.put(key, [key], dirty=True)
    with pytest.raises(OSError):
        c.write_dirty()
    assert [k for k, _ in o.stores] == [1]
    assert c.dirty == {1, 5, 9}  # a retry writes them all again
    o.fail_store_of = None
    assert c.write_dirty() is True
    assert [k for k, _ in o.stores] == [1, 1, 5, 9]


def test_a_failed_eviction_keeps_the_dirty_table() -> None:
    o = Owner(fail_store_of=1)
    c = o.cache(2)
    c.put(1, [1], dirty=True)
    c.get(2)
    with pytest.raises(OSError):
        c.get(3)
    assert 1 in c and 1 in c.dirty


def test_discard_forgets_without_writing() -> None:
    o = Owner()
    c = o.cache(4)
    c.put(1, [10], dirty=True)
    c.put(2, [20], dirty=True)
    c.discard(1)
    c.discard(42)  # unknown keys are fine
    assert 1 not in c and c.dirty == {2}
    c.write_dirty()
    assert o.stores == [(2, [20])]
    assert c.get(1) == [1] and o.loads == [1]  # loaded afresh from the owner


def test_clear_drops_everything_without_writing() -> None:
    o = Owner()
    c = o.cache(4)
    c.put(1, [10], dirty=True)
    c.get(2)
    c.clear()
    assert 1 not in c and 2 not in c and c.dirty == set()
    assert c.write_dirty() is False and o.stores == []
