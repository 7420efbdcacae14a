"""`Registry`: versioned soft prompts per task, with aliases, on top of any `PromptStore`.

Each task holds immutable numbered versions (``name@3``) and movable aliases (``name@prod``); a bare
name means the newest version. The registry owns names, metadata, checksums, references and listings;
the store (`store.PromptStore`, e.g. the folder-backed `local.LocalStore`) owns durability, atomicity and
numbering, and deals in names and bytes only.

Names: a task name matches ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}`` (ASCII only; it is one safe path component,
so "..", "." and ".tmp" are impossible; names are case-sensitive; all-digit names are allowed because
the version always follows "@"). An alias matches ``[A-Za-z][A-Za-z0-9_-]{0,31}``, so it can never be read
as a version number; "latest" is reserved and means the newest version.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import difflib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from softprompt.prompts.base import BaseModelSpec
from softprompt.prompts.errors import (
    CorruptPromptError,
    InvalidNameError,
    PromptNotFoundError,
    RegistryConflictError,
)
from softprompt.prompts.format.layout import ATTACHMENTS, METADATA, PEFT_WEIGHTS
from softprompt.prompts.format.stored import (
    adapter_files,
    check_attachments,
    metadata_bytes,
    missing_weights_error,
    parse_embeddings,
    parse_metadata,
    write_peft_folder,
)
from softprompt.prompts.format.tensor import PromptTensor, revalidate
from softprompt.prompts.refs import NAME_RE, PromptRef, validate_alias, validate_name, validate_version
from softprompt.prompts.registry.local import LocalStore
from softprompt.prompts.registry.store import MissingVersionError, PromptStore
from softprompt.prompts.registry.version import METADATA_FORMAT, PromptVersion

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
SWEEP_EVERY_S = 60.0  # how often registrations sweep crashed writers' temporaries (those an hour old)
_NAMED_TASKS = 20  # tasks a "no such task" message names
_NEARBY = 100  # task names on each side of a missing name that `nearby` compares it with
_ANY = object()  # set_alias without a compare-and-swap


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


class Registry:
    """Versioned soft prompts per task, with aliases, on top of a `PromptStore`.

    Safe to share between threads and between processes using the same store.
    """

    def __init__(self, root: str | Path | None = None, *, store: PromptStore | None = None) -> None:
        """Opens the store `store`, or a `LocalStore` on the folder `root` (exactly one of the two)."""
        if (root is None) == (store is None):
            raise ValueError("give exactly one of root or store")
        self.store: PromptStore = store if store is not None else LocalStore(root)  # type: ignore[arg-type]
        self._swept_at: float | None = None  # when register last swept crashed writers' temporaries
        self._sweep_lock = threading.Lock()

    def _sweep_stale_temp(self) -> None:
        """Removes crashed writers' temporaries, at most once per `SWEEP_EVERY_S`: they must be an hour old
        before they go, so sweeping on every registration (a listing of every temporary, an object-store
        round trip) would only cost each write more."""
        now = time.monotonic()
        with self._sweep_lock:
            if self._swept_at is not None and now - self._swept_at < SWEEP_EVERY_S:
                return
            self._swept_at = now
        self.store.clean_stale_temp()

    # -- writes

    def register(
        self,
        name: str,
        prompt: PromptTensor,
        base: BaseModelSpec,
        *,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        base_model_fingerprint: str | None = None,
        metrics: Mapping[str, float] | None = None,
        attachments: Mapping[str, bytes] | None = None,
        candidate: bool = False,
    ) -> PromptVersion:
        """Stores `prompt` as the next version of task `name` and returns it.

        `base_model_fingerprint` is what to record as the prompt's base model (None or "" records
        ``base.fingerprint``); compatibility checks belong to the caller (`format.check_base_model`).
        A trained prompt passes its held-out `metrics` and `attachments` (its training report and loss
        plot as bytes, see `format.ATTACHMENTS`), published with the weights as files of the version.
        A `candidate` (a trained version its quality gate turned down) is never what the bare name means.
        """
        validate_name(name)
        if not isinstance(description, str):
            raise TypeError(f"description must be a string, got {type(description).__name__}")
        tags = dict(tags or {})
        for key, value in tags.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"tags must map strings to strings, got {key!r}: {value!r}")
        check_attachments(attachments or {})
        # The prompt was validated when parsed; re-checking keeps a bad tensor built in code out of the store.
        prompt = revalidate(prompt, base)
        files = {**adapter_files(prompt, base), **(attachments or {})}
        metadata: dict[str, Any] = {
            "format": METADATA_FORMAT,
            "name": name,
            "num_virtual_tokens": prompt.num_virtual_tokens,
            "hidden_size": base.hidden_size,
            "sha256": hashlib.sha256(files[PEFT_WEIGHTS]).hexdigest(),
            "base_model_fingerprint": base_model_fingerprint or base.fingerprint,
            "base_model_id": base.model_id,
            "description": description,
            "tags": tags,
            "source_type": prompt.source_type,
            "init": prompt.init,
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            **prompt.method_metadata(),  # how it is served: "prompt" or "prefix" (with its KV layout)
            **({"candidate": True} if candidate else {}),
        }

        def numbered(version: int) -> dict[str, bytes]:
            metadata.update(version=version, created_at=_now_rfc3339())
            return {METADATA: metadata_bytes(metadata)}

        self._sweep_stale_temp()
        version = self.store.publish(name, files, numbered)
        return PromptVersion.from_metadata(metadata, where=f"{name}@{version}")

    def set_alias(self, name: str, alias: str, version: int, *, expected: int | None | object = _ANY) -> PromptVersion:
        """Points ``name@alias`` at `version` (creating or moving the alias) and returns that version.

        With `expected` (a version, or None for "no such alias yet") the move happens only if the alias
        still points there, else `RegistryConflictError`: a quality gate that compared against one
        version never overwrites a move made meanwhile.
        """
        validate_name(name)
        validate_alias(alias)
        validate_version(version)
        self.store.refresh(name)  # a write acts on the store as it is, never on a view of it
        self._require_task(name)
        # Each failed swap means another writer changed the table or deleted the version meanwhile, so
        # the loop always makes progress; looking again re-checks everything against the new state.
        while True:
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
            if self.store.swap_aliases(name, aliases, {**aliases, alias: version}):
                return self.resolve(PromptRef(name, version=version))

    def delete(self, ref: str, *, all_versions: bool = False, force: bool = False) -> list[str]:
        """Deletes one version ("name@N") or, with `all_versions`, every version and alias of a task.

        Returns the deleted refs, ascending. Deleting a version that aliases point at raises
        `RegistryConflictError` unless `force`, which removes those aliases too; the same rule holds for a
        whole task, whose aliases all point at versions it deletes. Version numbers are never reused afterwards.
        """
        parsed = PromptRef.parse(ref) if isinstance(ref, str) else ref
        name = parsed.name
        if all_versions:
            if "@" in str(ref):
                raise InvalidNameError(
                    f"deleting all versions takes a bare task name: pass {name!r}, not {str(ref)!r}"
                )
            return [f"{name}@{v}" for v in self._delete_task(name, force=force)]
        if parsed.version is None:
            raise InvalidNameError(
                f"delete needs an exact version such as '{name}@3' (got {str(ref)!r}); to delete every version "
                f"of {name!r}, pass all_versions=True (CLI: --all)"
            )
        version = parsed.version
        self.store.refresh(name)
        self._require_task(name)
        # As in set_alias, every failed step means another writer made progress; look again.
        while True:
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
            if pointing and not self.store.swap_aliases(
                name, aliases, {a: v for a, v in aliases.items() if v != version}
            ):
                continue
            try:
                if self.store.delete_version(name, version):
                    return [f"{name}@{version}"]
            except MissingVersionError:
                continue  # deleted meanwhile: the next look reports it

    def _delete_task(self, name: str, *, force: bool) -> list[int]:
        """Deletes every version and alias of task `name`; returns the deleted versions, ascending.

        Aliases are production pointers: as for one version, they are removed only with `force`.
        """
        self.store.refresh(name)
        self._require_task(name)
        remaining = self.store.versions(name)
        aliases = self.store.read_aliases(name)
        if not remaining and not aliases:
            raise PromptNotFoundError(self._describe_missing_task(name))
        deleted: list[int] = []
        while True:
            if aliases and not force:
                # Checked on every pass: an alias made meanwhile refuses the rest, as it would have at first.
                pointing = [f"{a} -> {name}@{v}" for a, v in sorted(aliases.items())]
                done = f" ({_join([f'{name}@{v}' for v in deleted])} already deleted)" if deleted else ""
                raise RegistryConflictError(
                    f"task {name!r} has alias(es) {_join(pointing)}{done}: move or delete them first, or pass "
                    f"force=True (CLI: --force) to delete the task and its aliases"
                )
            # Aliases go first, so a crash midway never leaves an alias pointing at nothing.
            if aliases and not self.store.swap_aliases(name, aliases, {}):
                aliases = self.store.read_aliases(name)
                continue
            refused = []
            for v in remaining:
                try:
                    (deleted if self.store.delete_version(name, v) else refused).append(v)
                except MissingVersionError:
                    continue  # another deleter was faster
            if not refused:
                return deleted
            # An alias was pointed at these meanwhile: clear the aliases again.
            remaining = refused
            aliases = self.store.read_aliases(name)

    def export(self, ref: str | PromptRef | PromptVersion, directory: str | Path) -> Path:
        """Writes a version's files into `directory` (created if missing) and returns the folder.

        The folder loads with ``peft.PeftModel.from_pretrained(base_model, folder)`` and also holds the
        version's ``softprompt.json`` and, for a trained version, its report and loss plot. The weights
        are checked against their checksum first (`CorruptPromptError`); `PromptNotFoundError` if the
        version was deleted.
        """
        version = ref if isinstance(ref, PromptVersion) else self.resolve(ref)
        return write_peft_folder(directory, self.files(version))

    def files(self, version: PromptVersion) -> dict[str, bytes]:
        """Every file of `version` by name (what `export` writes), the weights checked against their checksum
        (`CorruptPromptError`); `PromptNotFoundError` if the version was deleted."""
        try:
            files = {f: self.store.read_file(version.name, version.version, f)
                     for f in self.store.file_names(version.name, version.version)}
        except MissingVersionError:
            raise self._deleted(version) from None
        if PEFT_WEIGHTS not in files:
            raise missing_weights_error(self._where(version, PEFT_WEIGHTS))
        self._check_embeddings(version, files[PEFT_WEIGHTS])
        return files

    # -- reads


    def resolve(self, ref: str | PromptRef) -> PromptVersion:
        """The version a reference names: newest for a bare name, else the given version or alias.

        Over a store that serves a bounded-staleness view (`CachedStore`), what the view lacks is read
        through once before "not found": a version or alias another server just made works at once.
        """
        parsed = PromptRef.parse(ref) if isinstance(ref, str) else ref
        try:
            return self._resolve(parsed)
        except PromptNotFoundError:
            self.store.refresh(parsed.name)
            return self._resolve(parsed)

    def _resolve(self, parsed: PromptRef) -> PromptVersion:
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
                return self._newest_served(name, existing, aliases)
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

    def _newest_served(self, name: str, existing: list[int], aliases: Mapping[str, int]) -> PromptVersion:
        """What a bare name means: the newest version that is not a candidate its quality gate turned down."""
        # Production traffic on a bare name must not move to a version the gate rejected; usually the newest
        # version is no candidate, so this reads one metadata file, as resolving always did.
        candidates: list[str] = []
        for number in reversed(existing):
            try:
                version = self._read_version(name, number, aliases)
            except FileNotFoundError:
                continue  # deleted since the listing: the next newest
            if not version.candidate:
                return version
            candidates.append(version.ref)
        if candidates:
            raise PromptNotFoundError(
                f"task {name!r} has only candidate versions ({_summarize(candidates)}), which its quality gate kept "
                f"from the bare name: name one ({candidates[0]!r}) or point an alias at it"
            )
        raise PromptNotFoundError(f"{name} was deleted while it was being read; retry the request")

    def load_embeddings(self, version: PromptVersion) -> torch.Tensor:
        """The version's prompt matrix, checked against its recorded sha256 and shape.

        Raises `PromptNotFoundError` if the version was deleted and `CorruptPromptError` if its files
        no longer match their metadata.
        """
        try:
            data = self.store.read_file(version.name, version.version, PEFT_WEIGHTS)
        except MissingVersionError:
            raise self._deleted(version) from None
        except FileNotFoundError:
            raise missing_weights_error(self._where(version, PEFT_WEIGHTS)) from None
        return self._check_embeddings(version, data)

    def attachments(self, version: PromptVersion) -> dict[str, bytes]:
        """The version's extra files by name (those of `format.ATTACHMENTS` it carries); {} if none.

        Raises `PromptNotFoundError` if the version was deleted.
        """
        try:
            names = [f for f in self.store.file_names(version.name, version.version) if f in ATTACHMENTS]
            return {f: self.store.read_file(version.name, version.version, f) for f in names}
        except MissingVersionError:
            raise self._deleted(version) from None

    def tasks(self) -> list[str]:
        """Names of tasks with at least one version, sorted."""
        return [name for name in self.store.task_names() if self.store.versions(name)]

    def nearby(self, ref: str, tasks: int = 3) -> list[str]:
        """References near `ref` (which names nothing), for a "did you mean" message: when its task exists,
        that task's name, versions and aliases; else those of up to `tasks` tasks spelt like it.

        Looks among the task names sorted next to it (`_NEARBY` on each side), so it reads the few tasks it
        returns whatever the size of the registry; a typo in a name's first letters finds nothing.
        """
        name = ref.partition("@")[0]
        names = self.store.task_names()
        at = bisect.bisect_left(names, name)
        if at < len(names) and names[at] == name:
            close = [name]
        else:
            close = _spelt_like(name, names[max(0, at - _NEARBY):at + _NEARBY], tasks)
        refs: list[str] = []
        for task in close:
            versions = self.store.versions(task)
            if versions:
                aliases = sorted(self.store.read_aliases(task))
                refs += [task, *(f"{task}@{v}" for v in reversed(versions)), *(f"{task}@{a}" for a in aliases)]
        return refs

    def list_page(
        self, name: str | None = None, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "", *, after: str = ""
    ) -> tuple[list[PromptVersion], str]:
        """One page of versions: tasks sorted by name, each task's versions newest first.

        `name` limits the listing to one task (None or "": all tasks). `page_size` 0 means the default
        (100); it is capped at 1000. The returned token is "" on the last page; otherwise pass it back
        to continue. Tokens record the last key returned, so pages stay consistent while versions are
        added or deleted: nothing listed twice, and nothing that existed throughout is skipped (a version
        registered meanwhile appears only if it sorts after the token). A malformed token, or one from
        another listing, raises `InvalidNameError`. Instead of a token, `after` ("name@3") starts the page
        after that version, as a token ending there would (the version need not exist).

        A page reads its own tasks only, whatever the size of the registry.
        """
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 0:
            raise InvalidNameError(f"page_size must be a non-negative integer, got {page_size!r}")
        page_size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        only = validate_name(name) if name else ""
        if page_token and after:
            raise InvalidNameError("give a page token or a version to list after, not both")
        if after:
            ref = PromptRef.parse(after)
            if ref.version is None:
                raise InvalidNameError(f"list after an exact version such as 'name@3', not {after!r}")
            after_key: tuple[str, int] | None = (ref.name, ref.version)
        else:
            after_key = self._decode_token(page_token, only) if page_token else None
        return self._page(only, page_size, after_key)

    def _page(self, only: str, page_size: int, after: tuple[str, int] | None) -> tuple[list[PromptVersion], str]:
        """Up to `page_size` versions after the key `after` (of `only`'s versions, or of every task's)."""
        names = [only] if only else self.store.task_names()
        # Names are sorted: a page starts where the token left off, so each page reads its own tasks only.
        start = bisect.bisect_left(names, after[0]) if after is not None else 0
        page: list[PromptVersion] = []
        for task in (names[i] for i in range(start, len(names))):
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
        # FileNotFoundError (the version was deleted since it was listed) is for the caller to handle.
        raw = self.store.read_file(name, version, METADATA)
        metadata = parse_metadata(raw, where=self.store.location(name, version, METADATA))
        pointing = tuple(sorted(a for a, v in aliases.items() if v == version))
        result = PromptVersion.from_metadata(metadata, where=f"{name}@{version}", aliases=pointing)
        if result.name != name or result.version != version:
            raise CorruptPromptError(
                f"the folder of {name}@{version} holds metadata for {result.ref}: it was moved or copied by hand; "
                f"delete it and register the prompt again"
            )
        return result

    def _check_embeddings(self, version: PromptVersion, weights: bytes) -> torch.Tensor:
        tensor = parse_embeddings(weights, version.sha256, where=self._where(version, PEFT_WEIGHTS))
        if tuple(tensor.shape) != version.tensor_shape:
            raise CorruptPromptError(
                f"{version.ref} holds a {list(tensor.shape)} tensor but its metadata says "
                f"{list(version.tensor_shape)}: delete this version and register it again"
            )
        return tensor

    def _where(self, version: PromptVersion, filename: str) -> str:
        return self.store.location(version.name, version.version, filename)

    @staticmethod
    def _deleted(version: PromptVersion) -> PromptNotFoundError:
        return PromptNotFoundError(f"{version.ref} no longer exists (it was deleted): resolve the task again")

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
        # Checked first, so a typo gets the plain "no such task" message; the caller re-checks what it
        # needs against the store's state when it writes.
        if not self.store.versions(name):
            raise PromptNotFoundError(self._describe_missing_task(name))

    def _describe_missing_task(self, name: str) -> str:
        # Names the first tasks that still have versions, reading only as many tasks as it names: a typo in a
        # registry of 100,000 tasks must not read every task's versions.
        names = self.store.task_names()
        known: list[str] = []
        for looked, task in enumerate(names, 1):
            if self.store.versions(task):
                known.append(task)
                if len(known) == _NAMED_TASKS:
                    break
        if not known:
            return f"no task named {name!r}: the registry is empty; register a prompt first"
        more = len(names) - looked  # tasks not looked at (a few may have had every version deleted)
        shown = _join(known + ([f"{more} more"] if more else []))
        return f"no task named {name!r}; registered tasks: {shown}"

    def _describe_task(self, name: str, existing: list[int], aliases: Mapping[str, int] | None = None) -> str:
        if not existing:
            return self._describe_missing_task(name)
        if aliases is None:
            aliases = self.store.read_aliases(name)
        text = f"task {name!r} has version{'s' if len(existing) > 1 else ''} {_summarize(existing)}"
        if aliases:
            text += f" and alias{'es' if len(aliases) > 1 else ''} {_summarize(sorted(aliases))}"
        return text


def _spelt_like(name: str, candidates: list[str], n: int) -> list[str]:
    """Up to `n` of `candidates` spelt like `name`: the longest shared beginning first, then difflib's
    similarity. (difflib alone ranks "t212" as close to "t12x" as "t120" is, and breaks ties by the larger
    name, so a typo's neighbours would lose to names that merely share letters.)"""
    scored = []
    for candidate in candidates:
        ratio = difflib.SequenceMatcher(None, name, candidate).ratio()
        if ratio >= 0.5:
            shared = len(os.path.commonprefix([name, candidate]))
            scored.append((-shared, -ratio, candidate))
    return [candidate for *_, candidate in sorted(scored)[:n]]
