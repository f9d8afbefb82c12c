"""TableCache: a bounded LRU of decoded tables keyed by an integer, with a dirty set.

Writing a dirty table back goes through the owner's `store` callback, which is where the
owner enforces its ordering rule (e.g. an L2 table is only written after the refcounts it
relies on are durable)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class TableCache(Generic[T]):
    def __init__(
        self,
        capacity: int,
        load: Callable[[int], T],
        store: Callable[[int, T], None],
    ) -> None:
        self.capacity = max(2, capacity)
        self._load = load
        self._store = store
        self._tables: OrderedDict[int, T] = OrderedDict()
        self.dirty: set[int] = set()

    def __contains__(self, key: int) -> bool:
        return key in self._tables

    def keys(self) -> list[int]:
        """The keys held, least recently used first."""
        return list(self._tables)

    def get(self, key: int) -> T:
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        table = self._load(key)
        self._insert(key, table)
        return table

    def put(self, key: int, table: T, dirty: bool) -> None:
        self._insert(key, table)
        if dirty:
            self.dirty.add(key)

    def mark_dirty(self, key: int) -> None:
        if key not in self._tables:
            raise KeyError(key)
        self.dirty.add(key)

    def discard(self, key: int) -> None:
        """Forget a table without writing it (its cluster was freed)."""
        self._tables.pop(key, None)
        self.dirty.discard(key)

    def clear(self) -> None:
        self._tables.clear()
        self.dirty.clear()

    def write_dirty(self) -> bool:
        """Write every dirty table in key order; True when anything was written."""
        if not self.dirty:
            return False
        for key in sorted(self.dirty):
            self._store(key, self._tables[key])
        self.dirty.clear()
        return True

    def _insert(self, key: int, table: T) -> None:
        self._tables[key] = table
        self._tables.move_to_end(key)
        while len(self._tables) > self.capacity:
            old_key = next(iter(self._tables))
            if old_key == key:
                break
            if old_key in self.dirty:
                self._store(old_key, self._tables[old_key])
                self.dirty.discard(old_key)
            del self._tables[old_key]
