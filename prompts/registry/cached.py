"""A bounded-staleness view of a shared store: how replicas over one store agree without asking it per request.

Every request resolves its task through the registry: listing versions, reading aliases and
metadata. Over object storage that is several round trips per request, so a server keeps what it
read for `refresh_s` seconds: a version registered, an alias moved or a version deleted through any
other server is seen here within `refresh_s` (the bound replicas agree within), and this server's
own writes at once (each write drops the task's entries). A version named explicitly that the view
does not hold yet is read through (`refresh`), so a reference printed by another replica's
RegisterPrompt works here at the very next request.

Version files are immutable, so their bytes are kept until the version is seen deleted: small ones
(metadata) in their own generous LRU, so listing every version of a large registry reads each
`softprompt.json` once, and larger ones (prompt tensors) in a smaller LRU. When the store cannot be
reached, a view it already holds keeps serving, past its age, and the error reaches a caller only
for what was never read: cached versions keep serving through an outage, a new one answers UNAVAILABLE.

Every operation costs what its own task costs, whatever the number of tasks: entries are kept per
task, so a write forgets one task's in one step, and a task this server creates joins the cached task
list in place instead of the whole list being read again.
"""

from __future__ import annotations

import bisect
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
MAX_CACHED_FILE_BYTES = 64 << 20  # prompt tensors (and other large files) of the versions served lately
SMALL_FILE_BYTES = 4 << 10  # metadata and configs: kept in their own LRU
MAX_SMALL_FILE_BYTES = 256 << 20  # about 400,000 versions' softprompt.json

_FileKey = tuple[str, int, str]  # (task, version, file name)


class _BytesLru:
    """Files' bytes by (task, version, file), least recently used dropped beyond `max_bytes`; not thread-safe
    (the view's lock guards it). An index by version makes dropping a deleted version's files cost its own."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[_FileKey, bytes] = OrderedDict()
        self._by_version: dict[tuple[str, int], set[str]] = {}

    def get(self, key: _FileKey) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: _FileKey, data: bytes) -> None:
        if key in self._items or len(data) > self.max_bytes:
            return
        self._items[key] = data
        self._by_version.setdefault(key[:2], set()).add(key[2])
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            self._pop(next(iter(self._items)))

    def drop_version(self, name: str, version: int) -> None:
        for filename in list(self._by_version.get((name, version), ())):
            self._pop((name, version, filename))

    def _pop(self, key: _FileKey) -> None:
        self.bytes -= len(self._items.pop(key))
        names = self._by_version[key[:2]]
        names.discard(key[2])
        if not names:
            del self._by_version[key[:2]]


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
        self._tasks: tuple[float, list[str]] | None = None  # (read at, sorted names)
        # task -> what was read of it: ("versions",), ("aliases",), ("files", version) -> (read at, value)
        self._entries: dict[str, dict[tuple[str, ...], tuple[float, object]]] = {}
        self._files = _BytesLru(MAX_CACHED_FILE_BYTES)
        self._small = _BytesLru(MAX_SMALL_FILE_BYTES)

    # ------------------------------------------------------------------ reads

    def _fresh(self, name: str, key: tuple[str, ...], read: Callable[[], T]) -> T:
        """Task `name`'s cached value while younger than refresh_s, else read again; a stale one when the
        store is down."""
        now = self._clock()
        with self._lock:
            held = self._entries.get(name, {}).get(key)
        if held is not None and now - held[0] <= self.refresh_s:
            return held[1]  # type: ignore[return-value]
        try:
            value = read()
        except StoreUnavailableError as e:
            if held is None:
                raise
            log.warning("serving a view of %s %s read %.0f s ago: %s", name, key, now - held[0], e)
            return held[1]  # type: ignore[return-value]
        with self._lock:
            self._entries.setdefault(name, {})[key] = (now, value)
        return value

    def task_names(self) -> list[str]:
        """Task names, as read at most refresh_s ago (a task this server created: at once)."""
        now = self._clock()
        with self._lock:  # publish inserts into the held list: copied under the lock
            held = None if self._tasks is None else (self._tasks[0], list(self._tasks[1]))
        if held is not None and now - held[0] <= self.refresh_s:
            return held[1]
        try:
            names = self.inner.task_names()
        except StoreUnavailableError as e:
            if held is None:
                raise
            log.warning("serving a list of tasks read %.0f s ago: %s", now - held[0], e)
            return held[1]
        with self._lock:
            self._tasks = (now, list(names))
        return names

    def versions(self, name: str) -> list[int]:
        """A task's versions, as read at most refresh_s ago."""
        return list(self._fresh(name, ("versions",), lambda: self.inner.versions(name)))

    def read_aliases(self, name: str) -> dict[str, int]:
        """A task's aliases, as read at most refresh_s ago."""
        return dict(self._fresh(name, ("aliases",), lambda: self.inner.read_aliases(name)))

    def file_names(self, name: str, version: int) -> list[str]:
        """A version's files (immutable: kept while the version lives)."""
        return list(self._fresh(name, ("files", str(version)), lambda: self.inner.file_names(name, version)))

    def read_file(self, name: str, version: int, filename: str) -> bytes:
        """A version's file (immutable: kept, LRU, until the version is seen deleted)."""
        key = (name, version, filename)
        with self._lock:
            data = self._small.get(key) or self._files.get(key)
        if data is not None:
            return data
        data = self.inner.read_file(name, version, filename)
        with self._lock:
            (self._small if len(data) <= SMALL_FILE_BYTES else self._files).put(key, data)
        return data

    def location(self, name: str, version: int | None = None, filename: str | None = None) -> str:
        """Where the inner store keeps it."""
        return self.inner.location(name, version, filename)

    def refresh(self, name: str) -> None:
        """Forgets what was read of task `name`: the next read of it asks the store.

        Cached file bytes stay: a version another server deleted is no longer listed once its task is
        read again, and nothing reads the files of a version the registry does not list. The task list
        stays too: tasks are only ever added (their storage is never removed), and this server's own
        are added to it as they are created.
        """
        with self._lock:
            self._entries.pop(name, None)

    def cached_bytes(self) -> int:
        """Bytes of file contents this view holds now (small and large files)."""
        with self._lock:
            return self._small.bytes + self._files.bytes

    # ------------------------------------------------------------------ writes: through, then forget the task

    def publish(self, name: str, files: Mapping[str, bytes], numbered: Callable[[int], Mapping[str, bytes]]) -> int:
        """Publishes through the inner store; this server sees the new version (and a new task) at once."""
        try:
            return self.inner.publish(name, files, numbered)
        finally:
            self.refresh(name)
            with self._lock:
                if self._tasks is not None:
                    names = self._tasks[1]
                    at = bisect.bisect_left(names, name)
                    if at == len(names) or names[at] != name:
                        names.insert(at, name)

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
                self._small.drop_version(name, version)
                self._files.drop_version(name, version)
            self.refresh(name)

    def clean_stale_temp(self, max_age_s: float = STALE_TEMP_SECONDS) -> list[str]:
        """The inner store's maintenance."""
        return self.inner.clean_stale_temp(max_age_s)
