"""The one table that maps every known exception to its status: a gRPC status code and an HTTP status.

Transports read it through `status_for`: `grpc_api` turns the code name into a `grpc.StatusCode`,
`http_api` answers the HTTP status. HTTP follows Google's mapping of gRPC codes to HTTP (400 for
INVALID_ARGUMENT and FAILED_PRECONDITION, 429 RESOURCE_EXHAUSTED, 499 a client that cancelled, ...),
except where the web has a more precise status: an upload over the limit is 413. Anything not
listed is a bug: INTERNAL, 500.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from softprompt.prompts import errors as prompt_errors
from softprompt.server.core.errors import (
    CancelledError,
    DeadlineError,
    InvalidRequestError,
    OverloadedError,
    PreconditionError,
    PriorityNotAllowedError,
    ShuttingDownError,
    TrainingJobNotFoundError,
    UploadTooLargeError,
)


@dataclass(frozen=True)
class Status:
    """How a transport answers one kind of failure."""

    grpc: str  # a grpc.StatusCode name
    http: int


INVALID = Status("INVALID_ARGUMENT", 400)
PRECONDITION = Status("FAILED_PRECONDITION", 400)
NOT_FOUND = Status("NOT_FOUND", 404)
EXHAUSTED = Status("RESOURCE_EXHAUSTED", 429)
INTERNAL = Status("INTERNAL", 500)

# The most specific class must come first: lookup walks this in order with isinstance.
STATUS_TABLE: tuple[tuple[type[BaseException], Status], ...] = (
    (prompt_errors.InvalidNameError, INVALID),
    (prompt_errors.InvalidPromptError, INVALID),
    (prompt_errors.BaseModelMismatchError, PRECONDITION),
    (prompt_errors.PromptNotFoundError, NOT_FOUND),
    (prompt_errors.RegistryConflictError, Status("FAILED_PRECONDITION", 409)),
    (prompt_errors.CorruptPromptError, Status("DATA_LOSS", 500)),
    (prompt_errors.StoreUnavailableError, Status("UNAVAILABLE", 503)),
    (prompt_errors.ChatTemplateError, PRECONDITION),
    (prompt_errors.TrainingDataError, INVALID),
    (InvalidRequestError, INVALID),
    (PreconditionError, PRECONDITION),
    (OverloadedError, EXHAUSTED),
    (PriorityNotAllowedError, Status("PERMISSION_DENIED", 403)),
    (UploadTooLargeError, Status("RESOURCE_EXHAUSTED", 413)),
    (DeadlineError, Status("DEADLINE_EXCEEDED", 504)),
    (CancelledError, Status("CANCELLED", 499)),
    (ShuttingDownError, Status("UNAVAILABLE", 503)),
    (TrainingJobNotFoundError, NOT_FOUND),
    (MemoryError, EXHAUSTED),
)


def retry_after(exc: BaseException) -> int | None:
    """Whole seconds a client told to back off should wait (HTTP's Retry-After, gRPC's `retry-after` trailing
    metadata); None for errors that retrying later would not fix."""
    if isinstance(exc, OverloadedError):
        return max(1, math.ceil(exc.retry_after_s))
    return None


def status_for(exc: BaseException) -> Status:
    """The status of an exception; INTERNAL (500) for anything unexpected."""
    for cls, status in STATUS_TABLE:
        if isinstance(exc, cls):
            return status
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
        return EXHAUSTED
    return INTERNAL
