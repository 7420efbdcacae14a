"""The bearer-token file of `softprompt serve --auth-tokens`: its format, hashing and lookup.

One token a line, stored hashed so that the file grants nothing to whoever reads it:

    # HASH                                                                   ROLE   TASK PATTERNS...
    sha256:8aed4e05ee91e00387bf72a47c8af24e49a2b2792c37ff7c4d52caeeffee6af7  admin
    sha256:a7b5bbc351a1ec296a9839fc70dfb4f81c3ad5f2a8d6b080b57db63b5015b6b7  infer  sentiment*  -

HASH is `sha256:` and the lowercase hex SHA-256 of the token's UTF-8 bytes (`softprompt token new`
and `softprompt token hash` print it). ROLE is `infer` or `admin`. Task patterns are optional
shell-style globs (fnmatch, case-sensitive) over task names; without any, the token may use every
task; `-` stands for the bare base model (requests with no task). `#` starts a comment.

Standard library only: `softprompt token` runs from a client-only install.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

__all__ = [
    "BARE_MODEL_TASK",
    "HASH_PREFIX",
    "Role",
    "TokenEntry",
    "TokenFileError",
    "TokenTable",
    "format_entry",
    "hash_token",
]

HASH_PREFIX = "sha256:"
# Requests with an empty task run the bare base model; patterns name it like the CLI does.
BARE_MODEL_TASK = "-"
_HASH = re.compile(r"sha256:[0-9a-f]{64}")


class Role(enum.Enum):
    """What a token may do; each role includes everything the ones before it may do."""

    INFER = "infer"  # Inference service and Registry reads
    ADMIN = "admin"  # everything: also Registry writes and Training

    def includes(self, other: Role) -> bool:
        """Whether a holder of this role may do what `other` may."""
        order = list(Role)
        return order.index(self) >= order.index(other)


class TokenFileError(ValueError):
    """The token file cannot be read or has a malformed line."""


@dataclass(frozen=True)
class TokenEntry:
    """One line of the token file: a token's hash, its role and the tasks it may use."""

    token_hash: str
    role: Role
    task_patterns: tuple[str, ...] = ()  # empty: every task
    line: int = 0  # where it came from, to name the token in logs without revealing it

    def allows_task(self, task: str) -> bool:
        """Whether this token may use `task` (a bare name; BARE_MODEL_TASK for the base model)."""
        return not self.task_patterns or any(fnmatchcase(task, p) for p in self.task_patterns)


def hash_token(token: str) -> str:
    """The stored form of a token: `sha256:` and the hex digest of its UTF-8 bytes."""
    return HASH_PREFIX + hashlib.sha256(token.encode("utf-8")).hexdigest()


def format_entry(token_hash: str, role: Role, task_patterns: Iterable[str] = ()) -> str:
    """One token-file line for an already hashed token."""
    return "  ".join((token_hash, role.value, *task_patterns))


class TokenTable:
    """The tokens a server accepts."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self.entries = tuple(entries)

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        """Reads and validates a token file; `TokenFileError` names the file and line of any problem."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenFileError(f"cannot read the token file {path}: {e}") from None
        entries: list[TokenEntry] = []
        seen: set[str] = set()
        for number, raw in enumerate(text.splitlines(), start=1):
            fields = raw.split("#", 1)[0].split()
            if not fields:
                continue
            try:
                entry = _parse_line(fields, number)
            except ValueError as e:
                raise TokenFileError(f"{path}, line {number}: {e}") from None
            if entry.token_hash in seen:
                raise TokenFileError(f"{path}, line {number}: the same token is listed twice")
            seen.add(entry.token_hash)
            entries.append(entry)
        if not entries:
            raise TokenFileError(f"the token file {path} lists no token: nobody could call the server")
        return cls(entries)

    def lookup(self, token: str) -> TokenEntry | None:
        """The entry of a presented token, or None; takes the same time whichever entry matches."""
        presented = hash_token(token).encode("ascii")
        found: TokenEntry | None = None
        for entry in self.entries:
            # No early exit, so the time taken does not tell which entry (if any) matched.
            if hmac.compare_digest(presented, entry.token_hash.encode("ascii")):
                found = entry
        return found


def _parse_line(fields: list[str], number: int) -> TokenEntry:
    token_hash, *rest = fields
    if not _HASH.fullmatch(token_hash):
        # Never echo the field: it may be a plain token pasted by mistake.
        raise ValueError(
            f"the first field must be {HASH_PREFIX}<64 lowercase hex digits>, the hash of a token; "
            "tokens are not stored in plain text: make one with `softprompt token new ROLE`, or hash "
            "an existing one with `softprompt token hash`"
        )
    if not rest:
        raise ValueError(f"a role must follow the hash: one of {', '.join(r.value for r in Role)}")
    role_name, *patterns = rest
    try:
        role = Role(role_name)
    except ValueError:
        raise ValueError(f"unknown role {role_name!r}: use one of {', '.join(r.value for r in Role)}") from None
    return TokenEntry(token_hash, role, tuple(patterns), number)
