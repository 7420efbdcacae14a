"""Python client for the softprompt server: run and manage soft prompts over gRPC.

Importing this package needs only grpcio and protobuf (never torch or numpy).

Example:
    >>> from softprompt.client import Client, DecodingOptions, TrainingOptions
    >>> with Client("localhost:50051", timeout=30) as client:
    ...     client.register("sentiment", "out/sentiment-adapter")
    ...     print(client.generate("sentiment", "I loved this film", max_new_tokens=20).text)
    ...     sampled = DecodingOptions(temperature=0.8, top_p=0.95, max_new_tokens=60)
    ...     print(client.generate("sentiment", "Write a review:", options=sampled, seed=1).text)
    ...     job = client.train("sentiment", "train.jsonl", options=TrainingOptions(epochs=5))
    ...     print(client.wait_for_training_job(job.job_id).version)
    ...     print(client.classify("sentiment", "Dull.", ["positive", "negative"]).label)
"""

from softprompt.client.aio import AsyncClient
from softprompt.client.base import DEFAULT_TARGET
from softprompt.client.client import Client
from softprompt.client.credentials import TlsOptions
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
    ClassifyResult,
    EvalMetrics,
    ExportedPrompt,
    GenerateResult,
    CacheTier,
    KvCache,
    LabelScore,
    Limits,
    ModelInfo,
    PromptInfo,
    StreamChunk,
    TokenizeResult,
    TrainingJob,
    TrainingProgress,
    Usage,
)
from softprompt.prompts.options import DecodingKeywords, DecodingOptions, TrainingOptions
from softprompt.prompts.outcomes import FinishReason, TrainingState

__all__ = [
    "DEFAULT_TARGET",
    "Client",
    "AsyncClient",
    "TlsOptions",
    "DecodingOptions",
    "DecodingKeywords",
    "GenerateResult",
    "StreamChunk",
    "FinishReason",
    "Usage",
    "PromptInfo",
    "ExportedPrompt",
    "ModelInfo",
    "Limits",
    "CacheTier",
    "KvCache",
    "TokenizeResult",
    "ClassifyResult",
    "LabelScore",
    "TrainingOptions",
    "TrainingJob",
    "TrainingState",
    "TrainingProgress",
    "EvalMetrics",
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
