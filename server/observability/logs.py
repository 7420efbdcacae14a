"""Request ids in log records, and the server's log line format.

The interceptor sets `REQUEST_ID` while an RPC's handler runs on its gRPC thread; `RequestIdFilter`
copies it onto each record as `request_id`. Code running elsewhere (gRPC callbacks, the scheduler's
worker thread) does not see the context variable and passes `extra={"request_id": ...}` instead.

A line reads `ts=<UTC ISO 8601> level=<LEVEL> logger=<name> [request_id=<id>] <message>`; messages
about one request are key=value pairs themselves (`rpc=Generate task=... ms=...`).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("softprompt_request_id", default=None)
# The metadata key (gRPC) and header (HTTP) a request id travels in, both ways.
REQUEST_ID_KEY = "x-request-id"
# Client-chosen ids end up in log lines: only short tokens without spaces or control characters pass.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def request_id(pairs: Iterable[tuple[str, object]] | None) -> str:
    """The client's `x-request-id` among (key, value) pairs (gRPC metadata, HTTP headers) if it is a plain token
    of at most 128 characters, else a new 16-hex-digit id."""
    for key, value in pairs or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _CLIENT_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:16]


class RequestIdFilter(logging.Filter):
    """Stamps records with the current request id (None outside an RPC), keeping one passed in `extra`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=... logger=... request_id=... message`, request_id left out outside a request."""

    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__(datefmt="%Y-%m-%dT%H:%M:%S")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{super().formatTime(record, datefmt)}.{int(record.msecs):03d}Z"

    def formatMessage(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        rid = "" if request_id is None else f" request_id={request_id}"
        return f"ts={record.asctime} level={record.levelname} logger={record.name}{rid} {record.message}"

    def usesTime(self) -> bool:
        return True


def configure(level: str | int = "INFO") -> None:
    """Sends every log record to stderr in the key=value format, stamped with its request id."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(KeyValueFormatter())
    logging.basicConfig(level=level, handlers=[handler])
