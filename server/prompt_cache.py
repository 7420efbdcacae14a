"""Keeps recently used prompt tensors on the serving device, bounded in bytes (LRU)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

Key = tuple[str, int, str]  # (task, version, sha256): versions are immutable, the checksum guards reuse


class PromptCache:
    """A thread-safe LRU of device tensors; loads on miss through the given loader."""

    def __init__(self, max_bytes: int, device: torch.device, dtype: torch.dtype) -> None:
        self.max_bytes = max_bytes
        self.device = device
        self.dtype = dtype
        self._items: OrderedDict[Key, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Key, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Returns the cached tensor for `key`, loading and inserting it on a miss."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        # Load outside the lock: disk reads must not block other requests' hits.
        tensor = load().to(device=self.device, dtype=self.dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            if key not in self._items:
                self._items[key] = tensor
                self._bytes += size
                # A prompt larger than the whole budget is still served; it just is not kept.
                while self._bytes > self.max_bytes and self._items:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old.numel() * old.element_size()
            return tensor

    def evict(self, task: str, version: int | None = None) -> None:
        """Drops a task's versions (or one version) after a delete."""
        with self._lock:
            for key in [k for k in self._items if k[0] == task and (version is None or k[1] == version)]:
                old = self._items.pop(key)
                self._bytes -= old.numel() * old.element_size()
