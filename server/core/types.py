"""Requests and results as they cross between the gRPC edge and the scheduler (no protobuf, no torch)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from softprompt.prompts.outcomes import FinishReason


@dataclass(frozen=True)
class DecodingOptions:
    """A request's decoding parameters as the client sent them (0 means 'server default' / 'off')."""

    max_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    chat: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: which prompt, which input, how to decode, and until when (time.monotonic())."""

    task: str
    input: str
    options: DecodingOptions = DecodingOptions()
    deadline: float | None = None
    # A conversation of (role, content) turns, through the chat template, instead of `input`.
    messages: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token counts of a request; virtual (soft-prompt) tokens are counted apart from the input."""

    input_tokens: int
    virtual_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class StreamChunk:
    """What one decoding step produced for a request; the last chunk has finish_reason and usage."""

    text: str
    token_ids: tuple[int, ...]
    prompt_version: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    prompt_version: str

    @classmethod
    def from_chunks(cls, chunks: Iterable[StreamChunk]) -> GenerationResult:
        """Joins a generation's streamed chunks; the last carries the finish reason and usage."""
        text, ids, last = [], [], None
        for last in chunks:
            text.append(last.text)
            ids.extend(last.token_ids)
        assert last is not None and last.usage is not None and last.finish_reason is not None
        return cls("".join(text), tuple(ids), last.finish_reason, last.usage, last.prompt_version)


@dataclass(frozen=True)
class Tokenization:
    """Token ids and their string pieces."""

    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class ClassifyRequest:
    """Score candidate labels for one input under one task's prompt."""

    task: str
    input: str
    labels: tuple[str, ...]
    chat: bool = False
    deadline: float | None = None


@dataclass(frozen=True)
class LabelScore:
    """A label's log-probability as the whole output (its tokens plus end-of-sequence, or the chat end of turn)."""

    label: str
    logprob: float
    probability: float
    num_tokens: int


@dataclass(frozen=True)
class ClassifyResult:
    """Every label's score, in request order, and the most likely label."""

    scores: tuple[LabelScore, ...]
    label: str
    prompt_version: str
    input_tokens: int
    virtual_tokens: int
