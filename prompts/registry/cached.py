"""A bounded-staleness view of a shared store: how replicas over one store agree without asking it per request.

Every request resolves its task through the registry: listing versions, reading aliases and
metadata. Over object storage that is several round trips per request, so a server keeps what it
read for `refresh_s` seconds: a version registered, an alias moved or a version deleted through any
other server is seen here within `refresh_s` (the bound replicas agree within), and this server's
own writes at once (each write drops the task's entries). A version named explicitly that the view
does not hold yet is read through (`refresh`), so a reference printed by another replica's
RegisterPrompt works here at the very next request.

Version files are immutable, so their bytes are kept (LRU, bounded) until the version is seen
deleted. When the store cannot be reached, a view it already holds keeps serving, past its age,
and the error reaches a caller only for what was never read: cached versions keep serving through
an outage, a new one answers UNAVAILABLE.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TypeVar

from softprompt.prompts.errors import StoreUnavailableError
from softprompt.prompts.registry.store import STALE_TEMP_SECONDS, PromptStore

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_REFRESH_S = 1.0
MAX_CACHED_FILE_BYTES = 64 << 20  # metadata and prompt tensors of the versions served lately


class CachedStore(PromptStore):
    """`inner`'s tasks, versions and aliases as read at most `refresh_s` ago; its files' bytes until deleted."""

    def __init__(self, inner: PromptStore, refresh_s: float = DEFAULT_REFRESH_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if refresh_s < 0:
            raise ValueError(f"refresh_s must be >= 0 seconds, got {refresh_s}")
        self.inner = inner
        self.refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, ...], tuple[float, object]] = {}  # key -> (read at, value)
        self._files: OrderedDict[tuple[str, int, str], bytes] = OrderedDict()
        self._file_bytes = 0

    # ------------------------------------------------------------------ reads

    def _fresh(self, key: tuple[str, ...], read: Callable[[], T]) -> T:
        """The cached value while younger than refresh_s, else read again; a stale one when the store is down."""
        now = self._clock()
        with self._lock:
            held = self._entries.get(key)
        if held is not None and now - held[0] <= self.refresh_s:
            return held[1]  # type: ignore[return-value]
        try:
            value = read()
        except StoreUnavailableError as e:
            if held is None:
                raise
            log.warning("serving a view of %s read %.0f s ago: %s", key, now - held[0], e)
            return held[1]  # type: ignore[return-value]
        with self._lock:
            self._entries[key] = (now, value)
        return value

    def task_names(self) -> list[str]:
        """Task names, as read at most refresh_s ago."""
        return list(self._fresh(("tasks",), self.inner.task_names))

    def versions(self, name: str) -> list[int]:
        """A task's versions, as read at most refresh_s ago."""
        return list(self._fresh(("versions", name), lambda: self.inner.versions(name)))

    def read_aliases(self, name: str) -> dict[str, int]:
        """A task's aliases, as read at most refresh_s ago."""
        return dict(self._fresh(("aliases", name), lambda: self.inner.read_aliases(name)))

    def file_names(self, name: str, version: int) -> list[str]:
        """A version's files (immutable: kept while the version lives)."""
        return list(self._fresh(("files", name, str(version)), lambda: self.inner.file_names(name, version)))

    def read_file(self, name: str, version: int, filename: str) -> bytes:
        """A version's file (immutable: kept, LRU, until the version is seen deleted)."""
        key = (name, version, filename)
        with self._lock:
            if key in self._files:
                self._files.move_to_end(key)
                return self._files[key]
        data = self.inner.read_file(name, version, filename)
        with self._lock:
            if key not in self._files and len(data) <= MAX_CACHED_FILE_BYTES:
                self._files[key] = data
                self._file_bytes += len(data)
                while self._file_bytes > MAX_CACHED_FILE_BYTES:
                    _, dropped = self._files.popitem(last=False)
                    self._file_bytes -= len(dropped)
        return data

    def location(self, name: str, version: int | None = None, filename: str | None = None) -> str:
        """Where the inner store keeps it."""
        return self.inner.location(name, version, filename)

    def refresh(self, name: str) -> None:
        """Forgets what was read of task `name` (and the task list): the next read asks the store.

        Cached file bytes stay: a version another server deleted is no longer listed once its task is
        read again, and nothing reads the files of a version the registry does not list.
        """
        with self._lock:
            for key in [k for k in self._entries if k == ("tasks",) or (len(k) > 1 and k[1] == name)]:
                del self._entries[key]

    # ------------------------------------------------------------------ writes: through, then forget the task

    def publish(self, name: str, files: Mapping[str, bytes], numbered: Callable[[int], Mapping[str, bytes]]) -> int:
        """Publishes through the inner store; this server sees the new version at once."""
        try:
            return self.inner.publish(name, files, numbered)
        finally:
            self.refresh(name)

    def swap_aliases(self, name: str, expected: Mapping[str, int], new: Mapping[str, int]) -> bool:
        """Compare-and-swap on the inner store (never on the view: `expected` is checked there)."""
        try:
            return self.inner.swap_aliases(name, expected, new)
        finally:
            self.refresh(name)

    def delete_version(self, name: str, version: int) -> bool:
        """Deletes through the inner store and drops the version's cached files."""
        try:
            return self.inner.delete_version(name, version)
        finally:
            with self._lock:
                for key in [k for k in self._files if k[:2] == (name, version)]:
                    self._file_bytes -= len(self._files.pop(key))
            self.refresh(name)

    def clean_stale_temp(self, max_age_s: float = STALE_TEMP_SECONDS) -> list[str]:
        """The inner store's maintenance."""
        return self.inner.clean_stale_temp(max_age_s)
