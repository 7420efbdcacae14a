"""Prompt references: ``name``, ``name@3`` (a version) or ``name@prod`` (an alias), parsed and printed here only.

Torch-free, so the client, the auth rules, the metrics and the registry all share one type and one grammar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from softprompt.prompts.errors import InvalidNameError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
LATEST = "latest"
# Version numbers as written in refs: no sign, no leading zeros, so each version has one spelling.
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")


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


def validate_version(version: int) -> int:
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
            validate_version(self.version)
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


def task_name(ref: str) -> str:
    """The task name `ref` refers to ("a@3" -> "a"); never raises.

    Text that is no valid reference gives its part before the first '@' (possibly ""), so callers
    that only label or route by task (auth, metrics) can pass a request's text through unchecked
    and leave reporting it invalid to the code that resolves it.
    """
    try:
        return PromptRef.parse(ref).name
    except InvalidNameError:
        return ref.partition("@")[0]
