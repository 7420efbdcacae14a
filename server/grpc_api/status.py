"""The one table that maps every known exception to a gRPC status code."""

from __future__ import annotations

import grpc

from softprompt.prompts import errors as prompt_errors
from softprompt.server.core.errors import (
    CancelledError,
    DeadlineError,
    InvalidRequestError,
    OverloadedError,
    PreconditionError,
    ShuttingDownError,
    TrainingJobNotFoundError,
    UploadTooLargeError,
)

# The most specific class must come first: lookup walks this in order with isinstance.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (prompt_errors.InvalidNameError, grpc.StatusCode.INVALID_ARGUMENT),
    (prompt_errors.InvalidPromptError, grpc.StatusCode.INVALID_ARGUMENT),
    (prompt_errors.BaseModelMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (prompt_errors.PromptNotFoundError, grpc.StatusCode.NOT_FOUND),
    (prompt_errors.RegistryConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (prompt_errors.CorruptPromptError, grpc.StatusCode.DATA_LOSS),
    (prompt_errors.ChatTemplateError, grpc.StatusCode.FAILED_PRECONDITION),
    (prompt_errors.TrainingDataError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UploadTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (CancelledError, grpc.StatusCode.CANCELLED),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
    (TrainingJobNotFoundError, grpc.StatusCode.NOT_FOUND),
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception; INTERNAL for anything unexpected."""
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            return code
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.INTERNAL
