"""The response bodies of the OpenAI-compatible API as pydantic models: every answer is built from these, and
/openapi.json describes them.

The shapes are OpenAI's (completions, chat completions, their stream chunks, models, errors); `virtual_tokens`
in usage and the whole of `/v1/classify` are this server's own. A streamed chunk has `usage` only when the
request asked for it (`stream_options.include_usage`): `null` on every chunk but the last, as OpenAI sends it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Finish = Literal["stop", "length"]


class Usage(BaseModel):
    """A request's token counts."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    virtual_tokens: int = Field(description="Not OpenAI's: the soft prompt's virtual tokens, which run before the "
                                            "prompt's tokens")


# ---------------------------------------------------------------- completions


class CompletionChoice(BaseModel):
    """One prompt's text, or the piece of it one streamed chunk carries."""

    index: int
    text: str
    logprobs: None = None
    finish_reason: Finish | None


# Every answer and every chunk of a stream carries it, the same from the first chunk to the usage chunk.
FINGERPRINT = ("what ran: the prompt version the `model` resolved to (\"name@3\"), or the base model's id for no "
               "prompt; the same on every chunk of a stream")


class Completion(BaseModel):
    """`/v1/completions`'s answer; streamed, each chunk has this shape too (the last one choices [] and usage)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str = Field(description=FINGERPRINT)
    usage: Usage | None = None


# ---------------------------------------------------------------- chat completions


class ChatMessage(BaseModel):
    """The assistant's answer."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """The conversation's answer."""

    index: int
    message: ChatMessage
    logprobs: None = None
    finish_reason: Finish


class ChatCompletion(BaseModel):
    """`/v1/chat/completions`'s answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str = Field(description=FINGERPRINT)
    usage: Usage


def _absent(value: object) -> bool:
    return value is None


class ChatDelta(BaseModel):
    """What one streamed chunk adds to the answer; OpenAI leaves out what it does not set (`{}` on the last)."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_absent)
    content: str | None = Field(None, exclude_if=_absent)


class ChatChunkChoice(BaseModel):
    """The answer's piece in one streamed chunk."""

    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Finish | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (the last one choices [] and usage)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str = Field(description=FINGERPRINT)
    usage: Usage | None = None


# ---------------------------------------------------------------- models


class Model(BaseModel):
    """A `model` a request may name: the base model, a task (its newest version), a version or an alias."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str = Field(description="the exact version (\"name@3\"), or the base model's id")
    parent: str | None = Field(description="the base model's id; null for the base model itself")


class ModelList(BaseModel):
    """Every model the caller may use; with `limit`, one page of them and where the next starts."""

    object: Literal["list"] = "list"
    data: list[Model]
    has_more: bool | None = Field(None, description="with `limit`: whether another page follows")
    first_id: str | None = Field(None, description="with `limit`: the page's first id")
    last_id: str | None = Field(None, description="with `limit`: the page's last id, the next page's `after`")


# ---------------------------------------------------------------- classify


class LabelScore(BaseModel):
    """A label's log-probability as the whole output."""

    label: str
    logprob: float
    probability: float
    num_tokens: int


class Classification(BaseModel):
    """One input's most likely label, and every label's probability in request order."""

    index: int
    label: str
    probs: list[float]
    num_classes: int
    scores: list[LabelScore]


class ClassifyUsage(BaseModel):
    """The inputs' tokens (classification generates none)."""

    prompt_tokens: int
    total_tokens: int


class ClassifyResponse(BaseModel):
    """`/v1/classify`'s answer: one classification per input, in order."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    system_fingerprint: str = Field(description=FINGERPRINT)
    data: list[Classification]
    usage: ClassifyUsage


# ---------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    """What went wrong; `param` names the request field at fault."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, whatever its status."""

    error: ErrorDetail
