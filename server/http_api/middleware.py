"""ASGI middleware of the HTTP API: request ids and metrics for every request, and the body size limit.

`Observing` mirrors the gRPC interceptor: the client's `x-request-id` when it is a sane token (the
same rule, `logs.request_id`), else a fresh id, set in `logs.REQUEST_ID` while the request runs and sent back as a
response header; each request's route, status and duration go to the metrics (transport `http`)
when its response ends, a streamed one included, or when the client leaves (499).

`BodyLimit` answers 413 for a body over the upload limit, by its `Content-Length` or, for a chunked
body, as soon as the bytes read pass it, before the body is parsed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from softprompt.server.http_api.errors import respond
from softprompt.server.observability.logs import REQUEST_ID, REQUEST_ID_KEY, request_id
from softprompt.server.observability.metrics import Metrics

log = logging.getLogger(__name__)

TRANSPORT = "http"
CLIENT_CLOSED = 499  # nginx's status for a client that went away before the answer


def _route(scope: Scope) -> str:
    """The matched route's path template (bounded label values), "other" for an unmatched path."""
    route = scope.get("route")
    return getattr(route, "path", None) or "other"


class Observing:
    """Request ids, a log line and metrics per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())]
        rid = request_id(headers)
        started = time.monotonic()
        state: dict[str, Any] = {"status": CLIENT_CLOSED, "done": False}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID_KEY.encode(), rid.encode())]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._finish(scope, state, started, rid)

        token = REQUEST_ID.set(rid)
        try:
            await self.app(scope, receive, sending)
        finally:
            REQUEST_ID.reset(token)
            self._finish(scope, state, started, rid)  # a client that left mid-answer: counted here

    def _finish(self, scope: Scope, state: dict[str, Any], started: float, rid: str) -> None:
        if state["done"]:
            return
        state["done"] = True
        seconds = time.monotonic() - started
        route, status = _route(scope), state["status"]
        self.metrics.rpc_done(route, str(status), seconds, TRANSPORT)
        level = logging.DEBUG if status < 400 else logging.INFO
        log.log(level, "http=%s %s status=%s ms=%.0f", scope.get("method"), route, status, seconds * 1000,
                extra={"request_id": rid})


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for request bodies over `limit` bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counting() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, sending)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = respond(413, f"the request body is over this server's limit of {self.limit} bytes "
                                "(--max-upload-mb): send less", code="body_too_large")
        await response(scope, receive, send)
