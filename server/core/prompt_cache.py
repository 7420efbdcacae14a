"""Prompt memory in tiers, each an LRU bounded in bytes: every version's prompt matrix in host memory, the
matrices on the serving device, and the KV of each prompt's prefix.

Keys are (task, version, sha256): versions are immutable and the checksum guards reuse, so an
entry is never stale; deleting a version evicts its entries to free memory at once.

A request's prompt is looked up on the device (`PromptCache`), then in host memory (`HostTier`), and only
then read from the store; the host tier is filled at registration and, in the background, with every
stored version at start (`host_tier.HostTierLoader`), so a task's first request finds its prompt in memory
like any other's. On a CPU serving device in the host tier's dtype, the device entry is the host entry's
tensor itself (moving it is a no-op): the two tiers count the same bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

from softprompt.server.core.types import CacheStats

Key = tuple[str, int, str]  # (task, version, sha256)
V = TypeVar("V")
PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [positions, kv_heads, head_dim]:
# the KV pool's slot-major layout, so a prefix is copied into a row's blocks as it is


class DeviceLru(Generic[V]):
    """A thread-safe LRU bounded by the bytes of its values; `make` fills a miss.

    Every operation costs what its own entries cost, whatever the number held: an index by task makes
    evicting a deleted task's versions touch only those.
    """

    def __init__(self, max_bytes: int, nbytes: Callable[[V], int]) -> None:
        self.max_bytes = max_bytes
        self._nbytes = nbytes
        self._items: OrderedDict[Key, V] = OrderedDict()
        self._by_task: dict[str, set[Key]] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.loads = 0  # values made after a miss (or put ahead of one) and kept; a racing duplicate is not
        self.evictions = 0  # values dropped to stay within max_bytes
        self.pending = 0  # values a background helper has still to put (the prefix warmer's queue)

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
        """Inserts a value, evicting the least recently used beyond the budget; returns the value held for
        `key` (an earlier one if a racing miss put it first)."""
        with self._lock:
            if key in self._items:
                return self._items[key]
            self.loads += 1
            self._items[key] = value
            self._by_task.setdefault(key[0], set()).add(key)
            self._bytes += self._nbytes(value)
            # A value larger than the whole budget is still returned; it just is not kept.
            while self._bytes > self.max_bytes and self._items:
                self._drop(next(iter(self._items)))
                self.evictions += 1
            return value

    def has_room(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit within the budget without evicting anything."""
        with self._lock:
            return self._bytes + nbytes <= self.max_bytes

    def size(self) -> tuple[int, int]:
        """Entries held and their bytes."""
        with self._lock:
            return len(self._items), self._bytes

    def stats(self, pending: int | None = None) -> CacheStats:
        """Size, budget and counters now (`pending` by default what a background helper said it has left)."""
        pending = self.pending if pending is None else pending
        with self._lock:
            return CacheStats(entries=len(self._items), bytes=self._bytes, capacity_bytes=self.max_bytes,
                              hits=self.hits, misses=self.misses, loads=self.loads, evictions=self.evictions,
                              pending=pending)

    def evict(self, task: str, version: int | None = None) -> None:
        """Drops a task's versions (or one version) after a delete."""
        with self._lock:
            for key in [k for k in self._by_task.get(task, ()) if version is None or k[1] == version]:
                self._drop(key)

    def _drop(self, key: Key) -> None:
        self._bytes -= self._nbytes(self._items.pop(key))
        keys = self._by_task[key[0]]
        keys.discard(key)
        if not keys:
            del self._by_task[key[0]]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds."""
    return t.numel() * t.element_size()


def prefix_bytes(kv: PrefixKV) -> int:
    """Bytes a prefix's keys and values hold."""
    return sum(tensor_bytes(k) + tensor_bytes(v) for k, v in kv)


class HostTier:
    """Every version's prompt matrix in host memory (CPU, the serving dtype), LRU beyond `max_bytes`: what a
    prompt not on the device is taken from instead of the store.

    `pending` is what the background load (`host_tier.HostTierLoader`) has still to read.
    """

    def __init__(self, max_bytes: int, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.lru: DeviceLru[torch.Tensor] = DeviceLru(max_bytes, tensor_bytes)
        self.pending = 0

    def host_form(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` as the tier keeps it: on the CPU, in the serving dtype (the one cast serving makes anyway)."""
        return tensor.detach().to(device="cpu", dtype=self.dtype).contiguous()

    def get(self, key: Key, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The held matrix for `key`, loading (from the store) and keeping it on a miss."""
        return self.lru.get(key, lambda: self.host_form(load()))

    def put(self, key: Key, tensor: torch.Tensor) -> None:
        """Keeps a version's matrix ahead of its first request (at registration, by the background load)."""
        self.lru.put(key, self.host_form(tensor))

    def contains(self, key: Key) -> bool:
        """Whether `key` is held now (counts nothing)."""
        return self.lru.contains(key)

    def fits(self, tensor: torch.Tensor) -> bool:
        """Whether the tier has room for `tensor` in its form without evicting anything."""
        return self.lru.has_room(tensor.numel() * torch.empty((), dtype=self.dtype).element_size())

    def stats(self) -> CacheStats:
        """Size, budget, counters and what the background load has left."""
        return self.lru.stats(pending=self.pending)

    def evict(self, task: str, version: int | None = None) -> None:
        """Drops a task's versions (or one version) after a delete."""
        self.lru.evict(task, version)


class PromptCache:
    """Prompt tensors on the serving device; a miss takes the matrix from the host tier (when there is one),
    which reads the registry only for what it does not hold."""

    def __init__(self, max_bytes: int, device: torch.device, dtype: torch.dtype,
                 host: HostTier | None = None) -> None:
        self.device = device
        self.dtype = dtype
        self.host = host
        self._lru: DeviceLru[torch.Tensor] = DeviceLru(max_bytes, tensor_bytes)

    @property
    def lru(self) -> DeviceLru[torch.Tensor]:
        """The underlying LRU (its hit, miss and load counters feed metrics)."""
        return self._lru

    def get(self, key: Key, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Returns the cached tensor for `key`, taking it from the host tier (or `load`) and moving it to the
        device on a miss."""
        def make() -> torch.Tensor:
            tensor = load() if self.host is None else self.host.get(key, load)
            return tensor.to(device=self.device, dtype=self.dtype).contiguous()

        return self._lru.get(key, make)

    def keep(self, key: Key, tensor: torch.Tensor) -> None:
        """Puts a new version's matrix in the host tier ahead of its first request (no tier: nothing to do)."""
        if self.host is not None:
            self.host.put(key, tensor)

    def evict(self, task: str, version: int | None = None) -> None:
        """Drops a task's versions (or one version) after a delete, from the device and the host tier."""
        self._lru.evict(task, version)
        if self.host is not None:
            self.host.evict(task, version)


def prompt_tiers(prompts: PromptCache, prefixes: DeviceLru[PrefixKV]) -> dict[str, HostTier | DeviceLru]:
    """The tiers of prompt memory by the name ModelInfo and metrics give them, each with a `stats()`: "host"
    (when the server has a host tier), "prompt" (device matrices) and "prefix" (prefix keys and values)."""
    tiers: dict[str, HostTier | DeviceLru] = {} if prompts.host is None else {"host": prompts.host}
    return {**tiers, "prompt": prompts.lru, "prefix": prefixes}
