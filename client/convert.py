"""Conversions from protobuf responses to the client's dataclasses.

Protobuf stays at the edge: only this module and `softprompt.client.requests` touch generated
message classes, so the public API speaks plain Python types.
"""

from __future__ import annotations

from softprompt.protos import softprompt_pb2 as pb
from softprompt.client.types import (
    GenerateResult,
    Limits,
    ModelInfo,
    PromptInfo,
    StreamChunk,
    TokenizeResult,
    Usage,
)

_FINISH_REASONS: dict[int, str] = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_EOS: "eos",
}


def finish_reason(value: int) -> str | None:
    """Returns "length", "stop" or "eos", or None for FINISH_REASON_UNSPECIFIED."""
    return _FINISH_REASONS.get(value)


def usage(msg: pb.Usage) -> Usage:
    """Converts a Usage message."""
    return Usage(
        input_tokens=msg.input_tokens,
        virtual_tokens=msg.virtual_tokens,
        generated_tokens=msg.generated_tokens,
    )


def generate_result(msg: pb.GenerateResponse) -> GenerateResult:
    """Converts a GenerateResponse."""
    return GenerateResult(
        text=msg.text,
        token_ids=list(msg.token_ids),
        finish_reason=finish_reason(msg.finish_reason) or "",
        usage=usage(msg.usage),
        prompt_version=msg.prompt_version,
    )


def stream_chunk(msg: pb.GenerateStreamResponse) -> StreamChunk:
    """Converts one GenerateStreamResponse; usage is None unless the server set it (last chunk)."""
    return StreamChunk(
        text=msg.text,
        token_ids=list(msg.token_ids),
        finish_reason=finish_reason(msg.finish_reason),
        usage=usage(msg.usage) if msg.HasField("usage") else None,
        prompt_version=msg.prompt_version,
    )


def tokenize_result(msg: pb.TokenizeResponse) -> TokenizeResult:
    """Converts a TokenizeResponse."""
    return TokenizeResult(token_ids=list(msg.token_ids), tokens=list(msg.tokens))


def limits(msg: pb.Limits) -> Limits:
    """Converts a Limits message."""
    return Limits(
        max_new_tokens=msg.max_new_tokens,
        default_max_new_tokens=msg.default_max_new_tokens,
        max_input_tokens=msg.max_input_tokens,
        max_virtual_tokens=msg.max_virtual_tokens,
        max_batch_size=msg.max_batch_size,
        max_queued_requests=msg.max_queued_requests,
        max_upload_bytes=msg.max_upload_bytes,
    )


def model_info(msg: pb.ModelInfoResponse) -> ModelInfo:
    """Converts a ModelInfoResponse."""
    return ModelInfo(
        model_id=msg.model_id,
        hidden_size=msg.hidden_size,
        dtype=msg.dtype,
        device=msg.device,
        max_sequence_length=msg.max_sequence_length,
        vocab_size=msg.vocab_size,
        fingerprint=msg.fingerprint,
        limits=limits(msg.limits),
        has_chat_template=msg.has_chat_template,
    )


def prompt_info(msg: pb.PromptInfo) -> PromptInfo:
    """Converts a PromptInfo message."""
    return PromptInfo(
        name=msg.name,
        version=msg.version,
        ref=msg.ref,
        num_virtual_tokens=msg.num_virtual_tokens,
        hidden_size=msg.hidden_size,
        sha256=msg.sha256,
        base_model_fingerprint=msg.base_model_fingerprint,
        created_at=msg.created_at,
        description=msg.description,
        tags=dict(msg.tags),
        aliases=tuple(msg.aliases),
        peft_type=msg.peft_type,
    )


def deleted_refs(msg: pb.DeletePromptResponse) -> list[str]:
    """Returns the refs a DeletePromptResponse reports as deleted."""
    return list(msg.deleted)
