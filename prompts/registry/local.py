"""`LocalStore`: the registry's store on a local folder, the only module that knows the store is a folder.

Layout::

    <root>/
      .tmp/                      staging and trash folders (same filesystem, so renames are atomic)
      <name>/                    one folder per task
        .lock                    flock'ed by every writer of this task
        counter                  highest version number ever allocated
        aliases.json             {"prod": 3, ...}
        <N>/                     one immutable version, a folder PeftModel.from_pretrained loads
          adapter_config.json  adapter_model.safetensors  softprompt.json  [training.json  loss.png]

How it gives the guarantees of `store.PromptStore`:

- A version is written and fsynced in ``.tmp/``, then published by one ``os.rename``; deletion renames it
  back into ``.tmp/`` before removing its files.
- Every write of a task (numbering, publishing, alias swaps, deletes) runs under an exclusive
  ``fcntl.flock`` on ``<name>/.lock``, so several processes (servers, CLI) can share one store. The
  counter is persisted before a version is published, and task folders (so counters) are never removed.
- ``aliases.json`` and ``counter`` are replaced atomically (temp file in ``.tmp/``, fsync, ``os.replace``).
- Readers take no lock. Temp folders left by a crashed writer are ignored and removed after an hour.

The locking relies on POSIX ``fcntl.flock`` and a local filesystem (not NFS).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from softprompt.prompts.errors import RegistryConflictError
from softprompt.prompts.refs import NAME_RE, validate_name, validate_version
from softprompt.prompts.registry.store import (
    STALE_TEMP_SECONDS,
    MissingVersionError,
    PromptStore,
    decode_aliases,
    encode_aliases,
    validate_file_name,
)

log = logging.getLogger(__name__)

_VERSION_DIR_RE = re.compile(r"[1-9][0-9]*")
_ALIASES = "aliases.json"
_COUNTER = "counter"


def _fsync_dir(directory: Path) -> None:
    """Makes the entries of `directory` (creations, renames, deletions) durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    # The folder is published with a rename; fsyncing each file first means a crash after the rename
    # can never expose a complete-looking version with empty or partial files.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore(PromptStore):
    """A store on a local directory; see the module docstring for the layout and guarantees."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.clean_stale_temp()

    # -- paths

    def _task_dir(self, name: str) -> Path:
        # Every path is built from validated names, so it cannot leave the root.
        return self.root / validate_name(name)

    def version_dir(self, name: str, version: int) -> Path:
        """The version's folder (it may not exist); ``PeftModel.from_pretrained(base, folder)`` loads it."""
        return self._task_dir(name) / str(validate_version(version))

    def location(self, name: str, version: int | None = None, filename: str | None = None) -> str:
        path = self._task_dir(name) if version is None else self.version_dir(name, version)
        return str(path if filename is None else path / validate_file_name(filename))

    # -- reads

    def task_names(self) -> list[str]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(e.name for e in entries if NAME_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False))

    def versions(self, name: str) -> list[int]:
        try:
            entries = list(os.scandir(self._task_dir(name)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(e.name) for e in entries if _VERSION_DIR_RE.fullmatch(e.name) and e.is_dir())

    def file_names(self, name: str, version: int) -> list[str]:
        directory = self.version_dir(name, version)
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            raise MissingVersionError(f"{name}@{version} does not exist") from None
        return sorted(e.name for e in entries if e.is_file(follow_symlinks=False))

    def read_file(self, name: str, version: int, filename: str) -> bytes:
        directory = self.version_dir(name, version)
        try:
            return (directory / validate_file_name(filename)).read_bytes()
        except FileNotFoundError:
            if not directory.is_dir():
                raise MissingVersionError(f"{name}@{version} does not exist") from None
            raise

    def read_aliases(self, name: str) -> dict[str, int]:
        path = self._task_dir(name) / _ALIASES
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        return decode_aliases(raw, where=str(path))

    # -- writes

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        task_dir = self._task_dir(name)
        # flock locks the open file description, so it also excludes other threads of this process that
        # open the file themselves. Task folders are never removed, so the lock file stays the same inode.
        fd = os.open(task_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def _staging_dir(self) -> Iterator[Path]:
        staged = Path(tempfile.mkdtemp(prefix="stage-", dir=self.tmp))
        try:
            yield staged
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)

    def publish(
        self, name: str, files: Mapping[str, bytes], numbered: Callable[[int], Mapping[str, bytes]]
    ) -> int:
        task_dir = self._task_dir(name)
        with self._staging_dir() as staged:
            # The heavy writing happens outside the lock; only numbering and the rename are serialized.
            self._write_files(staged, files)
            if not task_dir.is_dir():
                task_dir.mkdir(exist_ok=True)
                _fsync_dir(self.root)
            with self._locked(name):
                version = self._allocate_version(task_dir)
                self._write_files(staged, numbered(version))
                self._move_into_place(staged, name, version)
        return version

    def swap_aliases(self, name: str, expected: Mapping[str, int], new: Mapping[str, int]) -> bool:
        # A task without a folder has no versions to point at; locking would create the folder.
        if not self._task_dir(name).is_dir():
            return False
        with self._locked(name):
            if self.read_aliases(name) != dict(expected):
                return False
            existing = set(self.versions(name))
            if any(v not in existing for a, v in new.items() if expected.get(a) != v):
                return False
            self._write_aliases(name, new)
        return True

    def delete_version(self, name: str, version: int) -> bool:
        source = self.version_dir(name, version)
        if not source.parent.is_dir():
            raise MissingVersionError(f"{name}@{version} does not exist")
        with self._locked(name):
            if not source.is_dir():
                raise MissingVersionError(f"{name}@{version} does not exist")
            if version in self.read_aliases(name).values():
                return False
            trash = self.tmp / f"trash-{name}-{version}-{uuid.uuid4().hex}"
            os.rename(source, trash)
            _fsync_dir(source.parent)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _write_files(self, directory: Path, files: Mapping[str, bytes]) -> None:
        for filename, data in files.items():
            _write_durably(directory / validate_file_name(filename), data)
        _fsync_dir(directory)

    def _allocate_version(self, task_dir: Path) -> int:
        counter_path = task_dir / _COUNTER
        try:
            counter = int(counter_path.read_text().strip() or 0)
        except FileNotFoundError:
            counter = 0
        except ValueError:
            # The counter is only a floor; the existing folders still bound it from below.
            log.warning("ignoring unreadable version counter %s", counter_path)
            counter = 0
        taken = [int(e.name) for e in os.scandir(task_dir) if _VERSION_DIR_RE.fullmatch(e.name)]
        version = max([counter, *taken]) + 1
        # Recorded before publishing: a crash in between leaves a gap, never a number that could come back.
        self._replace_file(task_dir, _COUNTER, f"{version}\n".encode())
        return version

    def _move_into_place(self, staged: Path, name: str, version: int) -> None:
        target = self.version_dir(name, version)
        if target.exists():
            raise RegistryConflictError(f"{name}@{version} already exists; this is a bug in version allocation")
        os.rename(staged, target)
        _fsync_dir(target.parent)

    def _write_aliases(self, name: str, aliases: Mapping[str, int]) -> None:
        task_dir = self._task_dir(name)
        if aliases:
            self._replace_file(task_dir, _ALIASES, encode_aliases(aliases))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(task_dir / _ALIASES)
                _fsync_dir(task_dir)

    def _replace_file(self, directory: Path, filename: str, data: bytes) -> None:
        # The temp file lives in .tmp/ (same filesystem, so os.replace stays atomic): a writer killed
        # before the replace leaves it where the stale-temp sweep removes it, not in the task folder forever.
        fd, tmp_name = tempfile.mkstemp(prefix=f"{directory.name}-{filename}-", suffix=".tmp", dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, directory / filename)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        _fsync_dir(directory)

    # -- maintenance

    def clean_stale_temp(self, max_age_s: float = STALE_TEMP_SECONDS) -> list[str]:
        removed: list[str] = []
        cutoff = time.time() - max_age_s
        try:
            entries = list(os.scandir(self.tmp))
        except FileNotFoundError:
            return removed
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
                removed.append(entry.path)
            except FileNotFoundError:
                continue  # another process cleaned it first
        return removed
