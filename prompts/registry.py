"""A versioned store of soft prompts: immutable numbered versions per task, aliases, atomic writes.

Layout of a local store (see `LocalStore`)::

    <root>/
      .tmp/                      staging and trash folders (same filesystem, so renames are atomic)
      <name>/                    one folder per task
        .lock                    flock'ed by every writer of this task
        counter                  highest version number ever allocated
        aliases.json             {"prod": 3, ...}
        <N>/                     one immutable version, a folder PeftModel.from_pretrained loads
          adapter_config.json  adapter_model.safetensors  softprompt.json

Guarantees:

- Readers never see a partial version: a version is written and fsynced in ``.tmp/``, then published by
  one ``os.rename``; deletion renames it back into ``.tmp/`` before removing its files.
- Version numbers are allocated under an exclusive ``fcntl.flock`` on ``<name>/.lock``, so several
  processes (servers, CLI) can share one store. Numbers are never reused, even after deletes: the
  counter is persisted before a version is published, and deleting a whole task keeps its counter.
- ``aliases.json`` and ``counter`` are replaced atomically (temp file in ``.tmp/``, fsync, ``os.replace``) under
  the lock.
- Readers take no lock. Temp folders left by a crashed writer are ignored and removed after an hour.

Names: a task name matches ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}`` (ASCII only; it is one safe path component,
so "..", "." and ".tmp" are impossible; names are case-sensitive; all-digit names are allowed because
the version always follows "@"). An alias matches ``[A-Za-z][A-Za-z0-9_-]{0,31}``, so it can never be read
as a version number; "latest" is reserved and means the newest version. The locking relies on POSIX
``fcntl.flock`` and a local filesystem (not NFS).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from softprompt.prompts import format as fmt
from softprompt.prompts.base import BaseModelSpec
from softprompt.prompts.errors import (
    CorruptPromptError,
    InvalidNameError,
    PromptNotFoundError,
    RegistryConflictError,
)

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
LATEST = "latest"
# Version numbers as written in refs: no sign, no leading zeros, so each version has one spelling.
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
_VERSION_DIR_RE = re.compile(r"[1-9][0-9]*")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
STALE_TEMP_SECONDS = 3600.0
_METADATA_FORMAT = 1
_ANY = object()  # set_alias without a compare-and-swap


# ---------------------------------------------------------------- names and references


def validate_name(name: str) -> str:
    """Returns `name` if it is a valid task name; `InvalidNameError` saying what is wrong otherwise."""
    if not isinstance(name, str):
        raise InvalidNameError(f"a task name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidNameError("the task name is empty: give a name such as 'sentiment'")
    if NAME_RE.fullmatch(name) is None:
        raise InvalidNameError(
            f"invalid task name {name!r}: a name is 1-64 ASCII letters, digits, '.', '_' or '-', starting with "
            f"a letter or digit (no '/', '@', spaces or leading dots)"
        )
    return name


def validate_alias(alias: str) -> str:
    """Returns `alias` if it is a valid, non-reserved alias; `InvalidNameError` otherwise."""
    if not isinstance(alias, str):
        raise InvalidNameError(f"an alias must be a string, got {type(alias).__name__}")
    if alias == LATEST:
        raise InvalidNameError(
            "'latest' is reserved (it always means the newest version): choose another alias such as 'prod'"
        )
    if ALIAS_RE.fullmatch(alias) is None:
        raise InvalidNameError(
            f"invalid alias {alias!r}: an alias is 1-32 ASCII letters, digits, '_' or '-', starting with a letter"
        )
    return alias


def _validate_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidNameError(f"invalid version {version!r}: versions are whole numbers starting at 1")
    return version


@dataclass(frozen=True)
class PromptRef:
    """A reference to a prompt: ``name`` (newest), ``name@3`` (a version) or ``name@prod`` (an alias).

    ``name@latest`` parses to the bare name: both mean the newest version.
    """

    name: str
    version: int | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.version is not None and self.alias is not None:
            raise InvalidNameError(f"a reference names a version or an alias, not both ({self.version}, {self.alias})")
        if self.version is not None:
            _validate_version(self.version)
        if self.alias is not None:
            validate_alias(self.alias)

    @classmethod
    def parse(cls, ref: str) -> PromptRef:
        """Parses "name", "name@N", "name@ALIAS" or "name@latest"; `InvalidNameError` otherwise."""
        if not isinstance(ref, str):
            raise InvalidNameError(f"a prompt reference must be a string, got {type(ref).__name__}")
        if not ref:
            raise InvalidNameError("the prompt reference is empty: use 'name', 'name@3' or 'name@prod'")
        name, at, suffix = ref.partition("@")
        if "@" in suffix:
            raise InvalidNameError(
                f"invalid prompt reference {ref!r}: it has more than one '@'; use 'name', 'name@3' or 'name@prod'"
            )
        validate_name(name)
        if not at:
            return cls(name)
        if not suffix:
            raise InvalidNameError(
                f"invalid prompt reference {ref!r}: nothing after '@'; use 'name@3', 'name@prod' or just 'name'"
            )
        if suffix == LATEST:
            return cls(name)
        if suffix[0].isascii() and suffix[0].isdigit():
            if _VERSION_RE.fullmatch(suffix) is None:
                raise InvalidNameError(
                    f"invalid version {suffix!r} in {ref!r}: versions are whole numbers starting at 1, "
                    f"written without leading zeros (e.g. '{name}@3')"
                )
            return cls(name, version=int(suffix))
        return cls(name, alias=validate_alias(suffix))

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


@dataclass(frozen=True)
class PromptVersion:
    """One stored, immutable version of a task's prompt, plus the aliases that point at it now."""

    name: str
    version: int
    num_virtual_tokens: int
    hidden_size: int
    sha256: str
    base_model_fingerprint: str
    base_model_id: str
    created_at: str
    description: str
    tags: dict[str, str] = field(hash=False)
    source_type: str
    aliases: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict, hash=False)

    @property
    def ref(self) -> str:
        """The exact reference of this version, "name@version"."""
        return f"{self.name}@{self.version}"

    def to_metadata(self) -> dict[str, Any]:
        """The ``softprompt.json`` content for this version (aliases are mutable, so not included)."""
        return {
            "format": _METADATA_FORMAT,
            "name": self.name,
            "version": self.version,
            "num_virtual_tokens": self.num_virtual_tokens,
            "hidden_size": self.hidden_size,
            "sha256": self.sha256,
            "base_model_fingerprint": self.base_model_fingerprint,
            "base_model_id": self.base_model_id,
            "created_at": self.created_at,
            "description": self.description,
            "tags": dict(self.tags),
            "source_type": self.source_type,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], *, where: str, aliases: tuple[str, ...] = ()) -> PromptVersion:
        """Builds a version from ``softprompt.json``; `CorruptPromptError` if fields are missing or mistyped."""
        try:
            tags = metadata["tags"]
            if not isinstance(tags, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
            ):
                raise TypeError("tags")
            metrics = metadata.get("metrics", {})
            if not isinstance(metrics, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) for k, v in metrics.items()
            ):
                raise TypeError("metrics")
            version = cls(
                name=_typed(metadata, "name", str),
                version=_typed(metadata, "version", int),
                num_virtual_tokens=_typed(metadata, "num_virtual_tokens", int),
                hidden_size=_typed(metadata, "hidden_size", int),
                sha256=_typed(metadata, "sha256", str),
                base_model_fingerprint=_typed(metadata, "base_model_fingerprint", str),
                base_model_id=_typed(metadata, "base_model_id", str),
                created_at=_typed(metadata, "created_at", str),
                description=_typed(metadata, "description", str),
                tags=dict(tags),
                source_type=_typed(metadata, "source_type", str),
                aliases=aliases,
                metrics={k: float(v) for k, v in metrics.items()},
            )
        except (KeyError, TypeError) as e:
            raise CorruptPromptError(
                f"the metadata of {where} is incomplete or damaged (field {e}): delete this version and "
                f"register the prompt again"
            ) from None
        return version


def _typed(metadata: Mapping[str, Any], key: str, kind: type) -> Any:
    value = metadata[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(key)
    return value


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _summarize(values: list[Any], limit: int = 20) -> str:
    shown = [str(v) for v in values[:limit]]
    if len(values) > limit:
        shown.append(f"{len(values) - limit} more")
    return _join(shown)


# ---------------------------------------------------------------- storage backends


class PromptStore(ABC):
    """The primitive operations `Registry` needs from a storage backend.

    Mutating operations (`allocate_version`, `publish`, `write_aliases`, `remove_version`,
    `remove_aliases`) are only called inside ``with store.locked(name):``. Reads take no lock and must
    only ever observe complete versions. An object-storage backend would implement the lock with
    conditional writes and `local_dir` with a local cache.
    """

    @abstractmethod
    def task_names(self) -> list[str]:
        """Names of tasks that have storage, sorted (some may have no versions left)."""

    @abstractmethod
    def versions(self, name: str) -> list[int]:
        """Version numbers of a task's complete versions, ascending; [] for an unknown task."""

    @abstractmethod
    def read_metadata(self, name: str, version: int) -> dict[str, Any]:
        """The version's ``softprompt.json``; FileNotFoundError if the version is gone."""

    @abstractmethod
    def read_aliases(self, name: str) -> dict[str, int]:
        """The task's alias table; {} if none."""

    @abstractmethod
    def local_dir(self, name: str, version: int) -> Path:
        """A local folder holding the version's files (loadable by ``PeftModel.from_pretrained``)."""

    @abstractmethod
    def locked(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Holds the task's exclusive writer lock (across processes) for the ``with`` block."""

    @abstractmethod
    def staging_dir(self) -> contextlib.AbstractContextManager[Path]:
        """A fresh local folder to write a version into; removed on exit unless published."""

    @abstractmethod
    def allocate_version(self, name: str) -> int:
        """Reserves and durably records the task's next version number (never reused)."""

    @abstractmethod
    def publish(self, name: str, version: int, staged: Path) -> None:
        """Makes the staged folder visible as ``name@version`` in one atomic step."""

    @abstractmethod
    def write_aliases(self, name: str, aliases: Mapping[str, int]) -> None:
        """Replaces the task's alias table atomically."""

    @abstractmethod
    def remove_version(self, name: str, version: int) -> None:
        """Makes a version invisible in one atomic step, then frees its storage."""


class LocalStore(PromptStore):
    """A store on a local directory; see the module docstring for the layout and guarantees."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.clean_stale_temp()

    # -- paths

    def _task_dir(self, name: str) -> Path:
        # Every path is built from a validated name, so it cannot leave the root.
        return self.root / validate_name(name)

    def local_dir(self, name: str, version: int) -> Path:
        return self._task_dir(name) / str(_validate_version(version))

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

    def read_metadata(self, name: str, version: int) -> dict[str, Any]:
        return fmt.read_metadata(self.local_dir(name, version))

    def read_aliases(self, name: str) -> dict[str, int]:
        path = self._task_dir(name) / "aliases.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            aliases = json.loads(raw.decode("utf-8"))
            if not isinstance(aliases, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in aliases.items()
            ):
                raise ValueError("not an object of alias -> version")
        except ValueError as e:
            raise CorruptPromptError(
                f"{path} is damaged ({e}): fix or delete it, then set the aliases again"
            ) from None
        return aliases

    # -- writes

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        task_dir = self._task_dir(name)
        if not task_dir.is_dir():
            task_dir.mkdir(exist_ok=True)
            fmt.fsync_dir(self.root)
        # flock locks the open file description, so it also excludes other threads of this process that
        # open the file themselves. Task folders are never removed, so the lock file stays the same inode.
        fd = os.open(task_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[Path]:
        staged = Path(tempfile.mkdtemp(prefix="stage-", dir=self.tmp))
        try:
            yield staged
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)

    def allocate_version(self, name: str) -> int:
        task_dir = self._task_dir(name)
        counter_path = task_dir / "counter"
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
        self._replace_file(task_dir, "counter", f"{version}\n".encode())
        return version

    def publish(self, name: str, version: int, staged: Path) -> None:
        target = self.local_dir(name, version)
        if target.exists():
            raise RegistryConflictError(f"{name}@{version} already exists; this is a bug in version allocation")
        fmt.fsync_dir(staged)
        os.rename(staged, target)
        fmt.fsync_dir(target.parent)

    def write_aliases(self, name: str, aliases: Mapping[str, int]) -> None:
        task_dir = self._task_dir(name)
        if aliases:
            data = json.dumps(dict(sorted(aliases.items())), indent=2).encode() + b"\n"
            self._replace_file(task_dir, "aliases.json", data)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(task_dir / "aliases.json")
                fmt.fsync_dir(task_dir)

    def remove_version(self, name: str, version: int) -> None:
        source = self.local_dir(name, version)
        trash = self.tmp / f"trash-{name}-{version}-{uuid.uuid4().hex}"
        os.rename(source, trash)
        fmt.fsync_dir(source.parent)
        shutil.rmtree(trash, ignore_errors=True)

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
        fmt.fsync_dir(directory)

    def clean_stale_temp(self, max_age_s: float = STALE_TEMP_SECONDS) -> list[Path]:
        """Removes leftovers of crashed writers in ``.tmp/`` older than `max_age_s`; returns what it removed."""
        removed: list[Path] = []
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
                removed.append(Path(entry.path))
            except FileNotFoundError:
                continue  # another process cleaned it first
        return removed


# ---------------------------------------------------------------- registry


class Registry:
    """Versioned soft prompts per task, with aliases, on top of a `PromptStore`.

    Safe to share between threads and between processes using the same store.
    """

    def __init__(self, root: str | Path | None = None, *, store: PromptStore | None = None) -> None:
        if (root is None) == (store is None):
            raise ValueError("give exactly one of root or store")
        self.store: PromptStore = store if store is not None else LocalStore(root)  # type: ignore[arg-type]

    # -- writes

    def register(
        self,
        name: str,
        prompt: fmt.PromptTensor,
        base: BaseModelSpec,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        base_model_fingerprint: str | None = None,
        metrics: Mapping[str, float] | None = None,
        attachments: Mapping[str, bytes] | None = None,
    ) -> PromptVersion:
        """Stores `prompt` as the next version of task `name` and returns it.

        `base_model_fingerprint` is what to record as the prompt's base model (None or "" records
        ``base.fingerprint``); compatibility checks belong to the caller (`format.check_base_model`).
        A trained prompt passes its held-out `metrics` and `attachments` (its training report and loss
        plot, see `format.ATTACHMENTS`), published in the version's folder together with the weights.
        """
        validate_name(name)
        if not isinstance(description, str):
            raise TypeError(f"description must be a string, got {type(description).__name__}")
        tags = dict(tags or {})
        for key, value in tags.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"tags must map strings to strings, got {key!r}: {value!r}")
        # The prompt was validated when parsed; re-checking keeps a bad tensor built in code out of the store.
        rows = int(prompt.embeddings.shape[0]) if prompt.embeddings.dim() else 1
        embeddings = fmt.validate_embeddings(prompt.embeddings, base, max_virtual_tokens=max(1, rows))
        prompt = fmt.PromptTensor(embeddings=embeddings, source_type=prompt.source_type, init=prompt.init)
        metadata: dict[str, Any] = {
            "format": _METADATA_FORMAT,
            "name": name,
            "num_virtual_tokens": prompt.num_virtual_tokens,
            "hidden_size": prompt.hidden_size,
            "base_model_fingerprint": base_model_fingerprint or base.fingerprint,
            "base_model_id": base.model_id,
            "description": description,
            "tags": tags,
            "source_type": prompt.source_type,
            "init": prompt.init,
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        }
        if isinstance(self.store, LocalStore):
            self.store.clean_stale_temp()
        with self.store.staging_dir() as staged:
            # The heavy writing happens outside the lock; only numbering and the rename are serialized.
            sha256 = fmt.write_version_files(staged, prompt, base, metadata)
            fmt.write_attachments(staged, attachments or {})
            with self.store.locked(name):
                version = self.store.allocate_version(name)
                metadata.update(sha256=sha256, version=version, created_at=_now_rfc3339())
                fmt.write_metadata(staged, metadata)
                self.store.publish(name, version, staged)
        return PromptVersion.from_metadata(metadata, where=f"{name}@{version}")

    def set_alias(self, name: str, alias: str, version: int, *, expected: int | None | object = _ANY) -> PromptVersion:
        """Points ``name@alias`` at `version` (creating or moving the alias) and returns that version.

        With `expected` (a version, or None for "no such alias yet") the move happens only if the alias
        still points there, else `RegistryConflictError`: a quality gate that compared against one
        version never overwrites a move made meanwhile.
        """
        validate_name(name)
        validate_alias(alias)
        _validate_version(version)
        self._require_task(name)
        with self.store.locked(name):
            existing = self.store.versions(name)
            if version not in existing:
                raise PromptNotFoundError(
                    f"cannot point {name}@{alias} at version {version}: {self._describe_task(name, existing)}"
                )
            aliases = self.store.read_aliases(name)
            if expected is not _ANY and aliases.get(alias) != expected:
                current = f"version {aliases[alias]}" if alias in aliases else "nothing"
                raise RegistryConflictError(
                    f"{name}@{alias} now points at {current}, not {expected}: it was moved meanwhile; compare again"
                )
            aliases[alias] = version
            self.store.write_aliases(name, aliases)
        return self.resolve(PromptRef(name, version=version))

    def delete(self, ref: str, *, all_versions: bool = False, force: bool = False) -> list[str]:
        """Deletes one version ("name@N") or, with `all_versions`, every version and alias of a task.

        Returns the deleted refs, ascending. Deleting a version that aliases point at raises
        `RegistryConflictError` unless `force`, which removes those aliases too. Deleting a whole task
        removes its aliases without needing `force`. Version numbers are never reused afterwards.
        """
        parsed = PromptRef.parse(ref) if isinstance(ref, str) else ref
        name = parsed.name
        if all_versions:
            if "@" in str(ref):
                raise InvalidNameError(
                    f"deleting all versions takes a bare task name: pass {name!r}, not {str(ref)!r}"
                )
            self._require_task(name)
            with self.store.locked(name):
                existing = self.store.versions(name)
                aliases = self.store.read_aliases(name)
                if not existing and not aliases:
                    raise PromptNotFoundError(self._describe_missing_task(name))
                # Aliases go first, so a crash midway never leaves an alias pointing at nothing.
                self.store.write_aliases(name, {})
                for v in existing:
                    self.store.remove_version(name, v)
            return [f"{name}@{v}" for v in existing]
        if parsed.version is None:
            raise InvalidNameError(
                f"delete needs an exact version such as '{name}@3' (got {str(ref)!r}); to delete every version "
                f"of {name!r}, pass all_versions=True (CLI: --all)"
            )
        version = parsed.version
        self._require_task(name)
        with self.store.locked(name):
            existing = self.store.versions(name)
            if version not in existing:
                raise PromptNotFoundError(f"{name}@{version} does not exist: {self._describe_task(name, existing)}")
            aliases = self.store.read_aliases(name)
            pointing = sorted(a for a, v in aliases.items() if v == version)
            if pointing and not force:
                raise RegistryConflictError(
                    f"{name}@{version} is the target of alias(es) {_join(pointing)}: move them first "
                    f"(set_alias) or pass force=True (CLI: --force) to delete the version and those aliases"
                )
            if pointing:
                self.store.write_aliases(name, {a: v for a, v in aliases.items() if v != version})
            self.store.remove_version(name, version)
        return [f"{name}@{version}"]

    # -- reads

    def resolve(self, ref: str | PromptRef) -> PromptVersion:
        """The version a reference names: newest for a bare name, else the given version or alias."""
        parsed = PromptRef.parse(ref) if isinstance(ref, str) else ref
        name = parsed.name
        # A concurrent delete can remove the chosen version between listing and reading; retrying picks
        # the next newest for a bare name and reports "not found" otherwise.
        for _ in range(3):
            existing = self.store.versions(name)
            aliases = self.store.read_aliases(name)
            if parsed.alias is not None:
                if parsed.alias not in aliases:
                    raise PromptNotFoundError(
                        f"{name} has no alias {parsed.alias!r}: {self._describe_task(name, existing, aliases)}"
                    )
                version = aliases[parsed.alias]
            elif parsed.version is not None:
                version = parsed.version
            elif existing:
                version = existing[-1]
            else:
                raise PromptNotFoundError(self._describe_missing_task(name))
            if version not in existing:
                raise PromptNotFoundError(
                    f"{parsed} does not exist: {self._describe_task(name, existing, aliases)}"
                )
            try:
                return self._read_version(name, version, aliases)
            except FileNotFoundError:
                if parsed.version is not None or parsed.alias is not None:
                    break
        raise PromptNotFoundError(f"{parsed} was deleted while it was being read; retry the request")

    def load_embeddings(self, version: PromptVersion) -> torch.Tensor:
        """The version's prompt matrix, checked against its recorded sha256 and shape.

        Raises `PromptNotFoundError` if the version was deleted and `CorruptPromptError` if its files
        no longer match their metadata.
        """
        directory = self.version_dir(version)
        tensor = fmt.read_embeddings(directory, version.sha256)
        if tuple(tensor.shape) != (version.num_virtual_tokens, version.hidden_size):
            raise CorruptPromptError(
                f"{version.ref} holds a {list(tensor.shape)} tensor but its metadata says "
                f"[{version.num_virtual_tokens}, {version.hidden_size}]: delete this version and register it again"
            )
        return tensor

    def version_dir(self, version: PromptVersion) -> Path:
        """The version's folder, which ``peft.PeftModel.from_pretrained(base_model, folder)`` loads."""
        directory = self.store.local_dir(version.name, version.version)
        if not directory.is_dir():
            raise PromptNotFoundError(f"{version.ref} no longer exists (it was deleted): resolve the task again")
        return directory

    def tasks(self) -> list[str]:
        """Names of tasks with at least one version, sorted."""
        return [name for name in self.store.task_names() if self.store.versions(name)]

    def list_page(
        self, name: str | None = None, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> tuple[list[PromptVersion], str]:
        """One page of versions: tasks sorted by name, each task's versions newest first.

        `name` limits the listing to one task (None or "": all tasks). `page_size` 0 means the default
        (100); it is capped at 1000. The returned token is "" on the last page; otherwise pass it back
        to continue. Tokens record the last key returned, so pages stay consistent while versions are
        added or deleted: nothing listed twice, and nothing that existed throughout is skipped (a version
        registered meanwhile appears only if it sorts after the token). A malformed token, or one from
        another listing, raises `InvalidNameError`.
        """
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 0:
            raise InvalidNameError(f"page_size must be a non-negative integer, got {page_size!r}")
        page_size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        only = validate_name(name) if name else ""
        after = self._decode_token(page_token, only) if page_token else None

        names = [only] if only else self.store.task_names()
        page: list[PromptVersion] = []
        for task in names:
            if after is not None and task < after[0]:
                continue
            versions = sorted(self.store.versions(task), reverse=True)
            if after is not None and task == after[0]:
                versions = [v for v in versions if v < after[1]]
            if not versions:
                continue
            aliases = self.store.read_aliases(task)
            for v in versions:
                if len(page) == page_size:
                    last = page[-1]
                    return page, self._encode_token(only, last.name, last.version)
                try:
                    page.append(self._read_version(task, v, aliases))
                except FileNotFoundError:
                    continue  # deleted since the listing
                except CorruptPromptError as e:
                    # One damaged version must not hide the rest; resolving it reports the damage.
                    log.warning("skipping %s@%s in listing: %s", task, v, e)
        return page, ""

    # -- helpers

    def _read_version(self, name: str, version: int, aliases: Mapping[str, int]) -> PromptVersion:
        metadata = self.store.read_metadata(name, version)
        pointing = tuple(sorted(a for a, v in aliases.items() if v == version))
        result = PromptVersion.from_metadata(metadata, where=f"{name}@{version}", aliases=pointing)
        if result.name != name or result.version != version:
            raise CorruptPromptError(
                f"the folder of {name}@{version} holds metadata for {result.ref}: it was moved or copied by hand; "
                f"delete it and register the prompt again"
            )
        return result

    @staticmethod
    def _encode_token(only: str, name: str, version: int) -> str:
        raw = json.dumps({"f": only, "n": name, "v": version}, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def _decode_token(token: str, only: str) -> tuple[str, int]:
        bad = (
            f"invalid page token {token[:40]!r}: pass the next_page_token of the previous response unchanged, "
            f"or an empty token to start from the first page"
        )
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            data = json.loads(raw.decode("utf-8"))
            filt, name, version = data["f"], data["n"], data["v"]
        except (binascii.Error, ValueError, UnicodeDecodeError, KeyError, TypeError):
            raise InvalidNameError(bad) from None
        if not isinstance(filt, str) or not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
            raise InvalidNameError(bad)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidNameError(bad)
        if filt != only:
            raise InvalidNameError(
                f"the page token belongs to a listing of {filt or 'all tasks'!r}, not of {only or 'all tasks'!r}: "
                f"repeat the same name with each page, or start again with an empty token"
            )
        return name, version

    def _require_task(self, name: str) -> None:
        # Checked before locking, because taking the lock creates the task's folder: a typo must not
        # leave an empty task behind. The caller re-checks what it needs under the lock.
        if not self.store.versions(name):
            raise PromptNotFoundError(self._describe_missing_task(name))

    def _describe_missing_task(self, name: str) -> str:
        known = self.tasks()
        if not known:
            return f"no task named {name!r}: the registry is empty; register a prompt first"
        return f"no task named {name!r}; registered tasks: {_summarize(known)}"

    def _describe_task(self, name: str, existing: list[int], aliases: Mapping[str, int] | None = None) -> str:
        if not existing:
            return self._describe_missing_task(name)
        if aliases is None:
            aliases = self.store.read_aliases(name)
        text = f"task {name!r} has version{'s' if len(existing) > 1 else ''} {_summarize(existing)}"
        if aliases:
            text += f" and alias{'es' if len(aliases) > 1 else ''} {_summarize(sorted(aliases))}"
        return text
