"""The bounded in-memory cache every memo of the processor uses (verified session tokens, accepted API keys, broker
adapters by version, validated manifests, GetProduct answers): one size bound, one eviction rule."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A map of at most `size` entries. Adding one past that evicts the least recently used entry (read or written
    last the longest ago), so a burst of new keys never costs the entries in steady use, and memory stays bounded
    whatever keys callers send."""

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a bounded cache holds at least one entry")
        self._size = size
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value kept for `key` (now the most recently used), or None."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Keep `value` for `key`, evicting the least recently used entry when full."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> V | None:
        """Forget `key`; its value, or None."""
        return self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
