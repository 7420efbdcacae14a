"""Request ids in log records, and the server's log line format.

The interceptor sets `REQUEST_ID` while an RPC's handler runs on its gRPC thread; `RequestIdFilter`
copies it onto each record as `request_id`. Code running elsewhere (gRPC callbacks, the scheduler's
worker thread) does not see the context variable and passes `extra={"request_id": ...}` instead.

A line reads `ts=<UTC ISO 8601> level=<LEVEL> logger=<name> [request_id=<id>] <message>`; messages
about one request are key=value pairs themselves (`rpc=Generate task=... ms=...`).
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("softprompt_request_id", default=None)


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
