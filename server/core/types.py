"""Requests and results as they cross between the gRPC edge and the scheduler (no protobuf, no torch)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from softprompt.prompts.options import DecodingOptions
from softprompt.prompts.outcomes import FinishReason


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


@dataclass(frozen=True)
class KvUsage:
    """The pool's size and occupancy at one moment (for ModelInfo, metrics and admission)."""

    block_size: int  # token slots per block
    total_blocks: int  # blocks rows may hold (the reserved block 0 excluded)
    used_blocks: int
    rows: int  # rows holding blocks now (decoding, or part way through a chunked prefill)
    bytes_per_token: int  # keys and values of one token over all layers

    @property
    def free_blocks(self) -> int:
        """Blocks no row holds."""
        return self.total_blocks - self.used_blocks

    @property
    def total_tokens(self) -> int:
        """Tokens the pool holds when full."""
        return self.total_blocks * self.block_size

    @property
    def free_tokens(self) -> int:
        """Token slots in free blocks."""
        return self.free_blocks * self.block_size

    @property
    def total_bytes(self) -> int:
        """Bytes of the pool's usable blocks."""
        return self.total_tokens * self.bytes_per_token
