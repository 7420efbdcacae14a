"""Requests and results as they cross between the gRPC edge and the scheduler (no protobuf, no torch)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from softprompt.prompts.options import DecodingOptions
from softprompt.prompts.outcomes import FinishReason
from softprompt.server.access.callers import Principal


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: which prompt, which input, how to decode, and until when (time.monotonic())."""

    task: str
    input: str
    options: DecodingOptions = DecodingOptions()
    deadline: float | None = None
    # A conversation of (role, content) turns, through the chat template, instead of `input`.
    messages: tuple[tuple[str, str], ...] = ()
    # Lower is served first (vLLM's convention); None: the task's default (--task-policy), else 0.
    priority: int | None = None
    principal: Principal = Principal()  # who sent it: a fair-share key, and the bound on `priority`


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
    principal: Principal = Principal()


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
    rows: int  # rows holding blocks now (decoding, part way through a chunked prefill, or parked having given way)
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


@dataclass(frozen=True)
class CacheStats:
    """One tier of prompt memory now and since start (ModelInfo, metrics): what it holds against its budget,
    and how often a lookup found its entry. The tiers: "host" (every version's prompt matrix in host memory),
    "prompt" (prompt matrices on the serving device) and "prefix" (keys and values of prompts' virtual tokens).
    """

    entries: int
    bytes: int
    capacity_bytes: int  # the budget; entries beyond it are evicted, least recently used first
    hits: int  # lookups that found their entry
    misses: int  # lookups that did not (the next tier, or the store, then filled it)
    loads: int  # entries put in (after a miss, at registration, or by the background load)
    evictions: int  # entries dropped to stay within the budget (deleted versions are not counted)
    # "host": versions its background load has still to read; "prefix": versions warming has still to look at
    pending: int = 0

    @property
    def hit_rate(self) -> float:
        """Hits per lookup since start (0 before the first)."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


@dataclass(frozen=True)
class TaskLoad:
    """One task's use of the server now and since start, as fair share sees it (ModelInfo, metrics, `top`)."""

    task: str  # the task's name; "-" for the bare model
    running: int  # rows decoding, or being prefilled in chunks
    queued: int  # requests waiting (Classify ones included)
    share: float  # fraction of the running rows it holds
    fair_share: float  # the fraction its weight entitles it to among the tasks running or waiting now
    weight: float
    priority: int  # its requests' default priority
    tokens_per_second: float  # input and output tokens computed for it lately (a few seconds' average)
    input_tokens: int  # positions prefilled or scored for it since start (recomputed ones included)
    output_tokens: int  # tokens generated for it since start
    refused: int  # requests refused by its limits since start
