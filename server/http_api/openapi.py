"""What /openapi.json says beyond the pydantic models, so that it says what the server does.

- Every status each operation answers, each with OpenAI's error model (`responses.ErrorResponse`) and when it
  happens (`errors`); never FastAPI's 422, which this API does not send (a bad body is 400, `errors.py`).
- The server-sent events a streamed completion answers (`errors(..., stream=True)`), beside the JSON answer.
- What only the running server knows (`install`): its base model's id as the example `model` (the one model
  every server has), its limits (--max-new-tokens as the maximum of `max_tokens` and `max_completion_tokens`,
  --max-stop-sequences, --max-labels), which values `after` takes, and whether it asks for a token at all (the
  bearer scheme and the 401s only with --auth-tokens: a server without tokens takes any `Authorization` header
  and answers no 401).
- What admission checks beyond the types (stop sequences of 1-256 characters, distinct labels that are not
  blank), so that a body the schema allows is one the server takes, and one it forbids is refused.

tests/test_openapi.py runs schemathesis against a live server with all its checks, so the schema and the server
cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from softprompt.prompts.options import MAX_STOP_CHARS
from softprompt.prompts.refs import NAME_RE
from softprompt.server.http_api.responses import ErrorResponse
from softprompt.server.service.api import Services

# When each status is answered; an operation lists those it can answer.
WHEN: dict[int, str] = {
    400: "a bad body or parameter (`param` names it), or a request the model cannot run (input too long, ...)",
    401: "no valid token (the server has --auth-tokens): send `Authorization: Bearer <token>`",
    403: "a model the token may not use, or a priority its role may not ask for",
    404: "no such model (the message lists the closest ids)",
    413: "a body over the server's --max-upload-mb",
    429: "the request queue is full, or the task is over a --task-policy limit: retry after `Retry-After` seconds",
    499: "the client went away before the answer was ready (logged; no client reads it)",
    500: "a bug, or a stored prompt that no longer matches its checksum (the server log has the details)",
    503: "the server is shutting down, or its prompt store cannot be reached",
    504: "the request's deadline passed",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
}

# A character that is not whitespace as Python's str.isspace (the server's test of a blank label) sees it:
# spelt out, because a pattern's \S is ECMAScript's, which takes \x1c-\x1f and \x85 for text and \ufeff for space.
NOT_BLANK = r"[^\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"

# What each kind of operation can answer besides 200.
LISTING = (400, 401, 500, 503)
LOOKUP = (401, 403, 404, 500, 503)
GENERATION = (400, 401, 403, 404, 413, 429, 499, 500, 503, 504)


# One server-sent event of a streamed answer (OpenAPI 3.1: a text/event-stream schema describes each event).
_EVENT: dict[str, Any] = {
    "type": "object",
    "description": "with `stream: true`: one event per chunk, its `data` the chunk as JSON (the JSON answer's "
                   "shape; an error midway: the error model), then `data: [DONE]`",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}},
}


def errors(statuses: tuple[int, ...], *, stream: bool = False) -> dict[int | str, dict[str, Any]]:
    """An operation's `responses`: each of `statuses` with the error model, and with `stream` the 200 answer's
    server-sent events beside its JSON."""
    out: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": WHEN[status],
                 **({"headers": _HEADERS[status]} if status in _HEADERS else {})}
        for status in statuses
    }
    if stream:
        out[200] = {"content": {"text/event-stream": {"schema": _EVENT}}}
    return out


def install(app: FastAPI, services: Services, *, tokens: bool) -> None:
    """Makes `app.openapi` add what only the running server knows, once, on the first request for the schema;
    `tokens`: whether the server asks for a token (--auth-tokens)."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _complete(generate(), services, tokens=tokens)  # FastAPI keeps what it generated in app.openapi_schema
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _after_pattern(model_id: str) -> str:
    """What `GET /v1/models?after=` takes: nothing, the base model's id, or an exact version ("name@3")."""
    return rf"^(|{re.escape(model_id)}|{NAME_RE.pattern}@[1-9][0-9]{{0,17}})$"


def _complete(schema: dict[str, Any], services: Services, *, tokens: bool) -> None:
    info = services.inference.model_info()
    for operation in (op for path in schema.get("paths", {}).values() for op in path.values()):
        responses = operation.get("responses", {})
        responses.pop("422", None)  # FastAPI adds it to every operation with a body or query
        if not tokens:  # no token asked for, none refused
            operation.pop("security", None)
            responses.pop("401", None)
        for parameter in operation.get("parameters", ()):
            if parameter.get("name") == "model" and parameter.get("in") == "path":
                parameter["schema"]["examples"] = [info.model_id]
            if parameter.get("name") == "after" and parameter.get("in") == "query":
                for branch in parameter["schema"].get("anyOf", [parameter["schema"]]):
                    if branch.get("type") == "string":
                        branch["pattern"] = _after_pattern(info.model_id)
    if not tokens:
        schema.get("components", {}).pop("securitySchemes", None)
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    for body in components.values():
        properties = body.get("properties", {})
        if "model" in properties and "examples" not in properties["model"]:
            properties["model"]["examples"] = [info.model_id]
        for name in ("max_tokens", "max_completion_tokens"):
            for branch in properties.get(name, {}).get("anyOf", ()):
                if branch.get("type") == "integer":
                    branch["maximum"] = info.limits.max_new_tokens
        # What admission checks beyond the field types, so that a body the schema allows is one the server takes.
        for branch in properties.get("stop", {}).get("anyOf", ()):
            text = branch.get("items", branch)
            if text.get("type") == "string":
                text.update(minLength=1, maxLength=MAX_STOP_CHARS)
            if branch.get("type") == "array":
                branch["maxItems"] = info.limits.max_stop_sequences
        labels = properties.get("labels", {})
        if labels.get("type") == "array":
            labels.update(maxItems=info.limits.max_labels, uniqueItems=True)
            labels["items"]["pattern"] = NOT_BLANK
