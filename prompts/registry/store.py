"""The storage interface of the registry: tasks, numbered versions of named files (bytes), alias tables.

`PromptStore` is everything `Registry` needs from a backend, in names and bytes; a backend is one module
implementing it (`local.LocalStore` keeps a folder). Names reaching a store are already validated task
names, versions (ints >= 1) and file names matching `FILE_NAME_RE`; a backend re-checks whatever its own
safety depends on (a path component, an object key).

Guarantees every backend must give, to every thread and process sharing the store:

- **Atomic versions.** A version becomes visible (`versions`, `file_names`, `read_file`) with all its files
  at once and vanishes at once; readers never observe a partial version, and need no lock.
- **Numbers never reused.** `publish` gives a version a number above every number the task ever had,
  including deleted versions and versions of a task whose versions were all deleted. The number is
  durably recorded before the version becomes visible: a crash in between leaves a gap, never a number
  that could come back. Concurrent publishers get distinct numbers. A folder publishes them in
  increasing order; object storage, without a lock server, may show a racing writer's higher number
  while a lower one is still uploading (each writer's own versions appear in order, and the newest
  visible version is what a bare task name resolves to).
- **Aliases by compare-and-swap.** `swap_aliases` replaces a task's alias table in one atomic step, only
  if it still holds what the caller read, and only if every target it adds or moves exists at that
  moment; `delete_version` refuses a version an alias points at. Together: no alias ever points at a
  missing version.
- **Durability.** Whatever a call reported as done survives a crash of the process or the machine.
- **Crash leftovers stay invisible.** Temporaries of a writer that died are never listed or read, and
  `clean_stale_temp` removes those older than its age limit (never a live writer's younger ones).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

from softprompt.prompts.errors import CorruptPromptError

# A file of a version: one safe path component or object-key segment ("..", "." and hidden names impossible).
FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
STALE_TEMP_SECONDS = 3600.0


class MissingVersionError(FileNotFoundError):
    """The version does not exist: never published, or deleted (possibly while it was being read)."""


def validate_file_name(filename: str) -> str:
    """Returns `filename` if a version may hold a file of that name; ValueError otherwise."""
    if not isinstance(filename, str) or FILE_NAME_RE.fullmatch(filename) is None:
        raise ValueError(f"invalid file name {filename!r} for a stored version")
    return filename


def encode_aliases(aliases: Mapping[str, int]) -> bytes:
    """An alias table as stored: a JSON object sorted by alias."""
    return json.dumps(dict(sorted(aliases.items())), indent=2).encode() + b"\n"


def decode_aliases(raw: bytes, *, where: str) -> dict[str, int]:
    """Parses a stored alias table; `CorruptPromptError` naming `where` if it is damaged."""
    try:
        aliases = json.loads(raw.decode("utf-8"))
        if not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in aliases.items()
        ):
            raise ValueError("not an object of alias -> version")
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptPromptError(f"{where} is damaged ({e}): fix or delete it, then set the aliases again") from None
    return aliases


class PromptStore(ABC):
    """Tasks, their immutable numbered versions (named files) and alias tables; see the module docstring."""

    # -- reads: lock-free, and only ever of complete versions

    @abstractmethod
    def task_names(self) -> list[str]:
        """Names of tasks that have storage, sorted (some may have no versions left)."""

    @abstractmethod
    def versions(self, name: str) -> list[int]:
        """Version numbers of a task's complete versions, ascending; [] for an unknown task."""

    @abstractmethod
    def file_names(self, name: str, version: int) -> list[str]:
        """Names of the version's files, sorted; `MissingVersionError` if the version does not exist."""

    @abstractmethod
    def read_file(self, name: str, version: int, filename: str) -> bytes:
        """One file of a version.

        Raises `MissingVersionError` if the version does not exist, and a plain FileNotFoundError if it
        exists without that file.
        """

    @abstractmethod
    def read_aliases(self, name: str) -> dict[str, int]:
        """The task's alias table ({} if none); `CorruptPromptError` if it is damaged."""

    @abstractmethod
    def location(self, name: str, version: int | None = None, filename: str | None = None) -> str:
        """Where a task, version or file lives, for messages to people (a path, a URL)."""

    # -- writes: each one atomic on its own, safe against concurrent writers

    @abstractmethod
    def publish(
        self, name: str, files: Mapping[str, bytes], numbered: Callable[[int], Mapping[str, bytes]]
    ) -> int:
        """Publishes a new version of task `name` (created if new) under a newly allocated number; returns it.

        The version holds `files` plus ``numbered(version)``, the files that record their own number
        (kept cheap: it runs while the number is being allocated, so other publishers of the task wait).
        Either the version becomes visible complete, or (on any error) nothing does; the number is
        never handed out again either way.
        """

    @abstractmethod
    def swap_aliases(self, name: str, expected: Mapping[str, int], new: Mapping[str, int]) -> bool:
        """Replaces the task's alias table by `new` if it still equals `expected`; returns whether it did.

        Also returns False, changing nothing, if a version `new` adds or moves an alias to does not
        exist at that moment, or the task has no storage.
        """

    @abstractmethod
    def delete_version(self, name: str, version: int) -> bool:
        """Makes the version invisible in one atomic step, then frees its storage; returns True.

        Returns False, changing nothing, if an alias points at it; raises `MissingVersionError` if the
        version does not exist. Its number is never reused.
        """

    def refresh(self, name: str) -> None:
        """Forgets anything read of task `name`, for a store that keeps a view (`cached.CachedStore`);
        the others always read the store, so there is nothing to forget."""

    # -- maintenance

    @abstractmethod
    def clean_stale_temp(self, max_age_s: float = STALE_TEMP_SECONDS) -> list[str]:
        """Removes temporaries of crashed writers older than `max_age_s`; returns where they were."""
