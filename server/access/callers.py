"""Who sent a request, as scheduling sees it: the token's identity (a fair-share key) and role (which bounds the
priority it may ask for). Standard library only, like the rest of `access`.

The gRPC auth interceptor sets `CURRENT_CALLER` around each step of a call, as the request id is set, so a
servicer reads the caller without the token ever reaching it; the HTTP API builds one from its `Caller`.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from softprompt.server.access.tokens import HASH_PREFIX, Role, TokenEntry

ANONYMOUS = "anonymous"  # every caller of a server without --auth-tokens
_ID_DIGITS = 12  # of the token's SHA-256: tells tokens apart, and the hash is no secret (the file holds it)


@dataclass(frozen=True)
class Principal:
    """A request's sender: `identity` names its token (never the token itself), `role` its role; without
    --auth-tokens every caller is ANONYMOUS with no role (and may ask what an admin may: such a server
    listens on loopback only)."""

    identity: str = ANONYMOUS
    role: Role | None = None

    @classmethod
    def of(cls, entry: TokenEntry | None) -> Principal:
        """The principal of a token-file entry (None: the server takes no tokens)."""
        if entry is None:
            return cls()
        return cls(f"token:{entry.token_hash.removeprefix(HASH_PREFIX)[:_ID_DIGITS]}", entry.role)


CURRENT_CALLER: ContextVar[Principal] = ContextVar("softprompt_caller", default=Principal())
