"""The rows the engine runs, as the scheduler holds them: a generation (`Sequence`), a Classify label being scored
(`ScoreRow`), a row being prefilled in chunks (`PartialPrefill`), rows decoding together (`Batch`), and what a
step reports per row (`TokenEvent`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from softprompt.prompts.options import DecodingOptions
from softprompt.prompts.outcomes import FinishReason
from softprompt.server.core import virtual
from softprompt.server.core.forward import Fresh
from softprompt.server.core.kv_manager import RowBlocks
from softprompt.server.core.prompt_cache import Key
from softprompt.server.core.sampling import RowSampler
from softprompt.server.core.text import TextTracker
from softprompt.server.core.virtual import Prompt


@dataclass
class Sequence:
    """One request's row: its inputs, its sampling state, what it has produced and its KV blocks."""

    request_id: int
    input_ids: list[int]
    params: DecodingOptions
    prompt: Prompt | None = None  # virtual-token embeddings [n, hidden] or a KvPrefix, on the model's device and dtype
    prompt_key: Key | None = None  # (task, version, sha256): its prefix KV is cached under this key
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    text: TextTracker | None = None
    generator: torch.Generator | None = None  # a seeded sampled row's own; unseeded rows share the engine's
    kv: RowBlocks = field(default_factory=RowBlocks)  # its blocks in the KV pool (none while it waits)

    @property
    def num_virtual_tokens(self) -> int:
        """Soft-prompt positions in front of the input (virtual tokens, or a prefix's keys and values)."""
        return virtual.virtual_tokens(self.prompt)

    @property
    def length(self) -> int:
        """Positions this row occupies before generation."""
        return self.num_virtual_tokens + len(self.input_ids)

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV the row holds once it is prefilled and has taken its next step (a resumed row's
        generated tokens included): what it asks the KV manager for to join."""
        return self.length + len(self.generated) + 1

    @property
    def tokens(self) -> list[int]:
        """What the row's prefill runs after its prompt (a resumed row recomputes what it generated)."""
        return self.input_ids + self.generated

    @property
    def resumes_in_place(self) -> bool:
        """Whether its blocks hold every position but its last token's: true of a waiting row that gave way with
        its KV parked (`Engine.set_aside`) and kept it, which rejoins with that one query instead of a prefill."""
        return bool(self.generated) and self.kv.length == self.length + len(self.generated) - 1


@dataclass
class ScoreRow:
    """A Classify label row: the log-probability of `continuation` after `[prompt ; context]`, computed over
    KV blocks of its own that are given back once it is scored."""

    prompt: Prompt | None
    key: Key | None
    context: list[int]
    continuation: list[int]
    kv: RowBlocks = field(default_factory=lambda: RowBlocks(transient=True))

    @property
    def tokens(self) -> list[int]:
        """The tokens after the prompt."""
        return [*self.context, *self.continuation]

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV the row holds while it is scored."""
        return virtual.virtual_tokens(self.prompt) + len(self.context) + len(self.continuation)


@dataclass
class PartialPrefill:
    """A row being prefilled in chunks: the first `done` positions of its first forward are in its blocks.

    Its first forward (`plan`, made at the first chunk) is the prompt's virtual tokens that run fresh
    (the last one over a cached prefix, or the whole prompt) and then its tokens; chunks walk through
    those positions in order, so a prompt longer than the budget is chunked like any input.
    """

    sequence: Sequence
    done: int = 0
    plan: Fresh | None = None

    @property
    def total(self) -> int | None:
        """The fresh positions of the whole prefill, once planned."""
        if self.plan is None:
            return None
        return self.plan.positions


@dataclass(frozen=True)
class TokenEvent:
    """A row produced a token; `text` is the newly safe-to-show text (may be empty)."""

    request_id: int
    token_id: int
    text: str
    finish_reason: FinishReason | None


@dataclass
class Batch:
    """Rows decoding together: each row's keys and values are in its pool blocks (`Sequence.kv`), and
    `tokens` [rows] holds each row's newest token, the next step's input.

    A batch is changed in place by `decode`, `filter` and `concatenate`.
    """

    sequences: list[Sequence]
    tokens: torch.Tensor | None = None  # set by the prefill's first tokens
    # The rows' sampler and the rows it was built for: rebuilt only when rows join or leave.
    sampling: tuple[tuple[Sequence, ...], RowSampler] | None = None

    def __len__(self) -> int:
        return len(self.sequences)
