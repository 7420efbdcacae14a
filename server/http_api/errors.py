"""Errors as OpenAI's clients expect them: `{"error": {"message", "type", "param", "code"}}` (`responses.ErrorResponse`)
with the HTTP status.

The status of a service exception comes from the one table (`service.statuses`); validation errors
name the offending parameter in `param`; a full queue or a task over a limit of its --task-policy answers
429 with `Retry-After` (`statuses.retry_after`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from softprompt.server.core.errors import InvalidRequestError
from softprompt.server.http_api.responses import ErrorDetail, ErrorResponse
from softprompt.server.http_api.schemas import UnsupportedParameter
from softprompt.server.service.statuses import retry_after, status_for

# OpenAI's `type` for each status class; its SDKs map the status itself to an exception class.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 499: "cancelled", 503: "service_unavailable", 504: "timeout"}


class ApiError(Exception):
    """An error the HTTP layer itself raises (auth, an unknown model, a bad body)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def respond(status: int, message: str, *, param: str | None = None, code: str | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    """An error response."""
    body = ErrorResponse(error=ErrorDetail(message=message, type=_TYPES.get(status, "server_error"), param=param,
                                           code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def for_exception(exc: BaseException) -> JSONResponse:
    """The response to a service exception, by the one status table."""
    if isinstance(exc, ApiError):
        return respond(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)
    if isinstance(exc, UnsupportedParameter):
        return respond(400, str(exc), param=exc.param, code="unsupported_parameter")
    status = status_for(exc)
    wait = retry_after(exc)
    headers = None if wait is None else {"Retry-After": str(wait)}
    message = str(exc) if status.http < 500 else f"internal error: {type(exc).__name__}: {exc}"
    return respond(status.http, message, code=status.grpc.lower(), headers=headers)


def in_callers_terms(exc: InvalidRequestError, names: Mapping[str, str]) -> ApiError:
    """A service's refusal of a request field, naming the field as the HTTP caller sent it.

    `names` maps the service's field names to the body's (`max_new_tokens` -> `max_tokens`, `input` -> `prompt`):
    the message is reworded and `param` set, as OpenAI's clients read it.
    """
    message = str(exc)
    for service_name, body_name in names.items():
        message = re.sub(rf"\b{service_name}\b", body_name, message)
    param = names.get(exc.field, exc.field) if exc.field else None
    return ApiError(status_for(exc).http, message, param=param, code=status_for(exc).grpc.lower())


def _type_tag(part: object) -> bool:
    """Whether a location part names a member of a union (`str`, `list[str]`, `TextPart`), not a field."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "none"} or "[" in part
                                      or "-" in part or part[:1].isupper())


def _param(loc: tuple[Any, ...]) -> str | None:
    """`messages[0].content` from pydantic's location ("body", "messages", 0, "content", "str")."""
    parts = [p for p in loc if p != "body" and not _type_tag(p)]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


_EMPTY = ("string_too_short", "too_short")  # pydantic's kinds for a text or a list under its min_length


async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 naming the first bad parameter (FastAPI would answer 422 in its own shape)."""
    found = exc.errors()
    # Empty input is refused in gRPC's words, whichever member of a union (`prompt`: a text or a list) pydantic
    # happened to report first.
    empty = [e for e in found if e.get("type") in _EMPTY and (e.get("ctx") or {}).get("min_length") == 1]
    first = (empty or found or [{"loc": (), "msg": "invalid request body"}])[0]
    param = _param(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if empty and param is not None:
        fix = "give some text" if kind == "string_too_short" else "give at least one"
        return respond(400, f"{param} is empty: {fix}", param=param, code="invalid_parameter")
    if kind == "json_invalid":
        return respond(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
    if param is None:
        return respond(400, f"the body must be a JSON object: {first.get('msg')}", code="invalid_body")
    return respond(400, f"{param}: {first.get('msg')}", param=param, code="invalid_parameter")


async def on_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (404 route, 405 method) in OpenAI's shape."""
    return respond(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def on_error(request: Request, exc: Exception) -> JSONResponse:
    """Every other exception, by the status table."""
    return for_exception(exc)
