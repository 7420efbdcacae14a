"""Device-side LRU caches, bounded in bytes: prompt tensors, and the KV of each prompt's prefix.

Keys are (task, version, sha256): versions are immutable and the checksum guards reuse, so an
entry is never stale; deleting a version evicts its entries to free memory at once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

Key = tuple[str, int, str]  # (task, version, sha256)
V = TypeVar("V")
PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [positions, kv_heads, head_dim]:
# the KV pool's slot-major layout, so a prefix is copied into a row's blocks as it is


class DeviceLru(Generic[V]):
    """A thread-safe LRU bounded by the bytes of its values; `make` fills a miss."""

    def __init__(self, max_bytes: int, nbytes: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self._nbytes = nbytes
        self._items: OrderedDict[Key, V] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.loads = 0  # values made after a miss and kept (a racing miss on the same key is not)

    def get(self, key: Key, make: Callable[[], V]) -> V:
        """Returns the cached value for `key`, making and inserting it on a miss."""
        value = self.lookup(key)
        # Made outside the lock: a slow miss must not block other keys' hits.
        return value if value is not None else self.put(key, make())

    def lookup(self, key: Key) -> V | None:
        """The cached value (now the most recently used), or None on a miss."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def contains(self, key: Key) -> bool:
        """Whether `key` is cached now (counts nothing and changes no recency: for planning)."""
        with self._lock:
            return key in self._items

    def put(self, key: Key, value: V) -> V:
        """Inserts a value made after a miss, evicting the least recently used beyond the budget."""
        with self._lock:
            if key not in self._items:
                self.loads += 1
                self._items[key] = value
                self._bytes += self._nbytes(value)
                # A value larger than the whole budget is still returned; it just is not kept.
                while self._bytes > self.max_bytes and self._items:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= self._nbytes(old)
            return value

    def size(self) -> tuple[int, int]:
        """Entries held and their bytes."""
        with self._lock:
            return len(self._items), self._bytes

    def evict(self, task: str, version: int | None = None) -> None:
        """Drops a task's versions (or one version) after a delete."""
        with self._lock:
            for key in [k for k in self._items if k[0] == task and (version is None or k[1] == version)]:
                self._bytes -= self._nbytes(self._items.pop(key))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds."""
    return t.numel() * t.element_size()


def prefix_bytes(kv: PrefixKV) -> int:
    """Bytes a prefix's keys and values hold."""
    return sum(tensor_bytes(k) + tensor_bytes(v) for k, v in kv)


class PromptCache:
    """Prompt tensors on the serving device, loaded from the registry on a miss."""

    def __init__(self, max_bytes: int, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._lru: DeviceLru[torch.Tensor] = DeviceLru(max_bytes, tensor_bytes)

    @property
    def lru(self) -> DeviceLru[torch.Tensor]:
        """The underlying LRU (its hit, miss and load counters feed metrics)."""
        return self._lru

    def get(self, key: Key, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Returns the cached tensor for `key`, loading and moving it to the device on a miss."""
        return self._lru.get(key, lambda: load().to(device=self.device, dtype=self.dtype).contiguous())

    def evict(self, task: str, version: int | None = None) -> None:
        """Drops a task's versions (or one version) after a delete."""
        self._lru.evict(task, version)
