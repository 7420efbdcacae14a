"""Python client for the softprompt server: run and manage soft prompts over gRPC.

Importing this package needs only grpcio and protobuf (never torch or numpy).

Example:
    >>> from softprompt.client import Client
    >>> with Client("localhost:50051", timeout=30) as client:
    ...     client.register("sentiment", "out/sentiment-adapter")
    ...     print(client.generate("sentiment", "I loved this film").text)
"""

from softprompt.client.client import DEFAULT_TARGET, AsyncClient, Client
from softprompt.client.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SoftpromptError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
)
from softprompt.client.types import (
    GenerateResult,
    Limits,
    ModelInfo,
    PromptInfo,
    StreamChunk,
    TokenizeResult,
    Usage,
)

__all__ = [
    "DEFAULT_TARGET",
    "Client",
    "AsyncClient",
    "GenerateResult",
    "StreamChunk",
    "Usage",
    "PromptInfo",
    "ModelInfo",
    "Limits",
    "TokenizeResult",
    "SoftpromptError",
    "NotFoundError",
    "InvalidArgumentError",
    "FailedPreconditionError",
    "ResourceExhaustedError",
    "DeadlineExceededError",
    "UnavailableError",
    "UnauthenticatedError",
    "PermissionDeniedError",
    "UnimplementedError",
    "CancelledError",
    "InternalError",
    "from_rpc_error",
]
