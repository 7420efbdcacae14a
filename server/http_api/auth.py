"""Who may call the HTTP API: the same bearer tokens, roles and task patterns as gRPC (`access.tokens`).

Every route of this API is inference (the `infer` role, which `admin` includes): a request sends
`Authorization: Bearer <token>` (the OpenAI SDKs send their `api_key` so), 401 without a valid one;
a model naming a task outside the token's patterns is 403; `/v1/models` lists only what the token
may use. Without `--auth-tokens` everyone may call everything (the server then listens on loopback
only, as gRPC does).

`Authenticate` is the FastAPI dependency that gives each route its `Caller`; /openapi.json shows it as
the bearer security scheme.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from fastapi.security import HTTPBearer

from softprompt.prompts.refs import task_name
from softprompt.server.access.callers import Principal
from softprompt.server.access.tokens import BARE_MODEL_TASK, TokenEntry, TokenTable
from softprompt.server.http_api.errors import ApiError

_HOW_TO_SEND = ("send `Authorization: Bearer <token>` (OpenAI SDKs: api_key=<token>, or $OPENAI_API_KEY); "
                "tokens come from the server's operator (`softprompt token new`)")


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of one request; `entry` None when the server requires no token."""

    entry: TokenEntry | None

    @property
    def principal(self) -> Principal:
        """Who the caller is to fair share and priority bounds."""
        return Principal.of(self.entry)

    def may_use(self, task: str) -> bool:
        """Whether the caller may use `task` (a name or reference; "" is the bare base model)."""
        return self.entry is None or self.entry.allows_task(task_name(task) if task else BARE_MODEL_TASK)

    def check(self, task: str, model: str) -> None:
        """Raises 403 unless the caller may use `task` (the task `model` names)."""
        if not self.may_use(task):
            assert self.entry is not None
            raise ApiError(403, f"this token may not use model {model!r}: it is limited to tasks matching "
                                f"{' '.join(self.entry.task_patterns)}", code="permission_denied")


def authenticate(tokens: TokenTable | None, authorization: str | None) -> Caller:
    """The caller presenting `authorization` (the header's value); raises 401 when it is missing or invalid."""
    if tokens is None:
        return Caller(None)
    if not authorization:
        raise ApiError(401, f"this server requires a token: {_HOW_TO_SEND}", code="missing_token",
                       headers={"WWW-Authenticate": "Bearer"})
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, f"malformed Authorization header: {_HOW_TO_SEND}", code="invalid_token",
                       headers={"WWW-Authenticate": "Bearer"})
    entry = tokens.lookup(token)
    if entry is None:
        raise ApiError(401, "the token is not valid for this server: check it, or ask the server's operator for one",
                       code="invalid_token", headers={"WWW-Authenticate": "Bearer"})
    return Caller(entry)


class Authenticate(HTTPBearer):
    """The dependency that authenticates a request: `caller: Caller = Depends(Authenticate(tokens))`.

    A bearer scheme for the OpenAPI document (`HTTPBearer`), but with this API's own answers: 401 in OpenAI's
    error shape, telling a missing token from a malformed header and an unknown token.
    """

    def __init__(self, tokens: TokenTable | None) -> None:
        super().__init__(auto_error=False, scheme_name="bearer token",
                         description="a token from the server's --auth-tokens file (`softprompt token new`); none "
                                     "when the server has none")
        self.tokens = tokens

    async def __call__(self, request: Request) -> Caller:  # type: ignore[override]  # a Caller, not credentials
        return authenticate(self.tokens, request.headers.get("authorization"))
