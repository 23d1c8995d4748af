"""Bounded caches keyed by value: plans, layouts and block masks shared by equal patterns.

Patterns are immutable values (``==`` and ``hash`` follow their parameters), so a
pattern built anew with equal parameters finds what an equal one built before. Each
cache holds at most ``maxsize`` entries and drops the least recently used. A pattern
with ``cacheable = False`` (one decode step's mask, never seen again) is built each
time and stored nowhere, so it cannot push out the patterns a model reuses.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

__all__ = ["LRU", "clear_caches"]

_ALL: list["LRU"] = []


class LRU:
    """A dict of at most ``maxsize`` entries, least recently used dropped first; thread-safe."""

    def __init__(self, name: str, maxsize: int = 64):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive int, got {maxsize!r}")
        self.name, self.maxsize = name, maxsize
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        _ALL.append(self)

    def get(self, key, build, store: bool = True):
        """The entry for ``key``, built by ``build()`` (and stored, unless ``store`` is False) when absent."""
        if not store:  # a one-off value (a decode step's mask): build it, keep the cache for reusable ones
            return build()
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
        value = build()  # outside the lock: builds may call other caches
        with self._lock:
            self.misses += 1
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key) -> bool:
        return key in self._data

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0

    def __repr__(self) -> str:
        return f"LRU({self.name!r}, {len(self)}/{self.maxsize}, hits={self.hits}, misses={self.misses})"


def clear_caches() -> None:
    """Empty every cache of the process (plans, layouts, block masks, module patterns)."""
    for c in _ALL:
        c.clear()
