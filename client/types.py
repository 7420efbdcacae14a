"""Plain result types returned by the client.

These are frozen dataclasses built from the protobuf responses (see `softprompt.client.convert`),
so callers never handle generated protobuf classes and can use `dataclasses.asdict` for JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "Usage",
    "GenerateResult",
    "StreamChunk",
    "PromptInfo",
    "Limits",
    "ModelInfo",
    "TokenizeResult",
]


@dataclass(frozen=True)
class Usage:
    """Token counts of one generation.

    Attributes:
        input_tokens: real tokens of the input, after the chat template (if applied).
        virtual_tokens: soft-prompt tokens prepended to the input (0 for the bare model).
        generated_tokens: tokens the model produced.
    """

    input_tokens: int
    virtual_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class GenerateResult:
    """The completion of one `generate` call.

    Attributes:
        text: the generated text (a matched stop sequence is not included).
        token_ids: the generated token ids.
        finish_reason: "length", "stop" or "eos" ("" if the server did not say).
        usage: token counts.
        prompt_version: the prompt version actually used, e.g. "sentiment@3"; "" for the bare model.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    prompt_version: str


@dataclass(frozen=True)
class StreamChunk:
    """One message of a streamed generation.

    Attributes:
        text: the text produced since the previous chunk.
        token_ids: the tokens produced since the previous chunk.
        finish_reason: "length", "stop" or "eos" on the last chunk; None before it.
        usage: token counts, on the last chunk only.
        prompt_version: the prompt version used, e.g. "sentiment@3"; "" for the bare model.
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage | None
    prompt_version: str


@dataclass(frozen=True)
class PromptInfo:
    """One registered, immutable prompt version.

    Attributes:
        name: the task name.
        version: the version number (1, 2, ...).
        ref: "name@version".
        num_virtual_tokens: rows of the soft-prompt matrix.
        hidden_size: columns of the soft-prompt matrix (the base model's hidden size).
        sha256: checksum of the stored adapter_model.safetensors.
        base_model_fingerprint: fingerprint of the base model the prompt was made for ("" if unknown).
        created_at: RFC 3339 timestamp, UTC.
        description: free text given at registration.
        tags: free key/value labels given at registration.
        aliases: aliases pointing at this version (e.g. ("prod",)).
        peft_type: "PROMPT_TUNING", "P_TUNING" or "RAW".
    """

    name: str
    version: int
    ref: str
    num_virtual_tokens: int
    hidden_size: int
    sha256: str
    base_model_fingerprint: str
    created_at: str
    description: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    peft_type: str = ""


@dataclass(frozen=True)
class Limits:
    """The server's request limits (0 means unlimited or not reported).

    Attributes:
        max_new_tokens: the largest max_new_tokens a request may ask for.
        default_max_new_tokens: what max_new_tokens=0 means.
        max_input_tokens: the longest input, in real tokens.
        max_virtual_tokens: the longest soft prompt the server accepts.
        max_batch_size: requests decoded together in one batch.
        max_queued_requests: requests waiting before new ones are refused (RESOURCE_EXHAUSTED).
        max_upload_bytes: the largest prompt upload accepted by `register`.
    """

    max_new_tokens: int
    default_max_new_tokens: int
    max_input_tokens: int
    max_virtual_tokens: int
    max_batch_size: int
    max_queued_requests: int
    max_upload_bytes: int


@dataclass(frozen=True)
class ModelInfo:
    """The base model served and the server's limits.

    Attributes:
        model_id: the model's name or path.
        hidden_size: embedding width; soft prompts must have this many columns.
        dtype: the weights' dtype, e.g. "bfloat16".
        device: where the model runs, e.g. "cuda:0".
        max_sequence_length: the model's context length.
        vocab_size: the tokenizer's vocabulary size.
        fingerprint: identifies the base weights; compare with PromptInfo.base_model_fingerprint.
        limits: the server's request limits.
        has_chat_template: whether `chat=True` is supported.
    """

    model_id: str
    hidden_size: int
    dtype: str
    device: str
    max_sequence_length: int
    vocab_size: int
    fingerprint: str
    limits: Limits
    has_chat_template: bool


@dataclass(frozen=True)
class TokenizeResult:
    """The tokenization of a text.

    Attributes:
        token_ids: the token ids.
        tokens: the token strings, one per id.
    """

    token_ids: list[int]
    tokens: list[str]
