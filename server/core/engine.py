"""The tensor side of serving: prefill and decode steps over a batch of rows with different prompts.

A row's model input is `[prompt ; input]`: the task's soft-prompt vectors followed by the input's
token embeddings. Rows are left-padded to a common length, and positions count real tokens only
(`cumsum(mask) - 1`), so a row computes what it would compute alone: the reference is the base
model's full forward over `[prompt ; input]`, greedy, without a KV cache.

The batch contract follows text-generation-inference: `prefill` builds a batch from new rows,
`decode` advances every row by one token, `filter` drops finished rows and `concatenate` merges
batches, which lets the scheduler add and remove rows between any two steps.

Every row's keys and values live in its own blocks of the KV pool (`pool`), sized once at startup:
a prefill writes a row's prompt prefix and fresh positions there, each decode step one more token,
and a row leaving frees only its blocks. `filter` and `concatenate` move no keys or values at all.
A row longer than the scheduler's prefill budget is prefilled in chunks (`prefill_chunk`) straight
into its blocks; it joins a batch once its whole input is in.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch
from transformers import DynamicCache

from softprompt.prompts import inject
from softprompt.prompts.outcomes import FinishReason
from softprompt.prompts.tokens import eos_token_ids
from softprompt.server.core import kv
from softprompt.server.core.decode_step import DecodeStep
from softprompt.server.core.masks import MaskLayout
from softprompt.server.core.model import BaseModel
from softprompt.server.core.paged_cache import PagedCache, read_slots
from softprompt.server.core.pool import SCRATCH, KvPool, KvPoolFullError, LayerShape, RowKv
from softprompt.server.core.prompt_cache import DeviceLru, Key, PrefixKV, prefix_bytes
from softprompt.prompts.options import DecodingOptions
from softprompt.server.core.sampling import RowSampler, seeded_generator, unseeded_generator
from softprompt.server.core.text import TextTracker
from softprompt.server.core.types import KvUsage


@dataclass
class Sequence:
    """One request's row: its inputs, its sampling state and what it has produced."""

    request_id: int
    input_ids: list[int]
    params: DecodingOptions
    prompt: torch.Tensor | None = None  # [num_virtual_tokens, hidden] on the model's device and dtype
    prompt_key: Key | None = None  # (task, version, sha256): its prefix KV is cached under this key
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    text: TextTracker | None = None
    generator: torch.Generator | None = None  # a seeded sampled row's own; unseeded rows share the engine's
    kv: RowKv | None = None  # the row's blocks in the KV pool while it holds any

    @property
    def num_virtual_tokens(self) -> int:
        """Soft-prompt positions in front of the input."""
        return 0 if self.prompt is None else int(self.prompt.shape[0])

    @property
    def length(self) -> int:
        """Positions this row occupies before generation."""
        return self.num_virtual_tokens + len(self.input_ids)

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV the row holds once it is prefilled and has taken its next step (a resumed row's
        generated tokens included): what admission needs free for it."""
        return self.length + len(self.generated) + 1

    def release_kv(self) -> None:
        """Frees the row's blocks (a finished or preempted row; idempotent)."""
        if self.kv is not None:
            self.kv.free()
            self.kv = None


def fresh_positions(prompt: torch.Tensor | None, tokens: int) -> int:
    """Positions a prefill or scoring forward computes for a row of `tokens` tokens after `prompt`: the
    prompt's last virtual token and the tokens; the rest of the prompt is its cached prefix's KV."""
    return (0 if prompt is None else min(1, int(prompt.shape[0]))) + tokens


@dataclass
class PartialPrefill:
    """A row being prefilled in chunks: its first `done` tokens (after its prompt) are in its pool blocks."""

    sequence: Sequence
    done: int = 0

    @property
    def tokens(self) -> list[int]:
        """What the row's prefill runs after its prompt (a resumed row recomputes what it generated)."""
        return self.sequence.input_ids + self.sequence.generated


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


DEFAULT_KV_CACHE_BYTES = 2 << 30  # an Engine built without a budget (tests, benchmarks): 2 GiB, backed as used

# The parts of a step a StepTimings totals; `emit` (choosing the next tokens, detokenizing) runs
# inside prefill and decode.
STEP_PARTS = ("prefill", "decode", "emit", "filter", "concatenate")


class StepTimings:
    """Calls and host wall seconds per step part, recorded by the Engine whose `timings` it is.

    Nothing synchronizes the device for this, as a sync would stall the GPU pipelining: prefill and
    decode end in `.tolist()` of the sampled ids, which waits for the device anyway, while filter and
    concatenate only launch work on a GPU, whose device time shows up in the next decode.
    """

    def __init__(self) -> None:
        self.calls = dict.fromkeys(STEP_PARTS, 0)
        self.seconds = dict.fromkeys(STEP_PARTS, 0.0)

    def add(self, part: str, seconds: float) -> None:
        """Counts one call of `part` that took `seconds`."""
        self.calls[part] += 1
        self.seconds[part] += seconds

    def snapshot(self) -> dict[str, tuple[int, float]]:
        """(calls, seconds) per part so far."""
        return {part: (self.calls[part], self.seconds[part]) for part in STEP_PARTS}


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _timed(part: str) -> Callable[[_Method], _Method]:
    """Records an Engine method's calls into the engine's `timings`; while that is None, nothing is timed."""

    def wrap(method: _Method) -> _Method:
        @functools.wraps(method)
        def timed(self: Engine, *args: Any, **kwargs: Any) -> Any:
            timings = self.timings
            if timings is None:
                return method(self, *args, **kwargs)
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                timings.add(part, time.perf_counter() - start)

        return cast(_Method, timed)

    return wrap


class Engine:
    """Runs prefill and decode steps on the frozen base model.

    The keys and values of a prompt's virtual tokens depend on nothing but the prompt, so they are
    computed once per prompt version and kept (`prefixes`, LRU in bytes). A prefill then runs only
    each row's last virtual token and its input over that cached prefix; the result is the same
    as running `[prompt ; input]` whole.

    `cuda_graphs` (default: on for CUDA devices) replays decode steps from captured graphs;
    `pad_shapes` (default: as `cuda_graphs`) runs steps at the graphs' bucketed shapes, which tests
    use on CPU to check that padding changes no token.

    `ignore_eos` keeps a row generating past end-of-sequence tokens until `max_new_tokens` or a stop
    string (as vLLM's `DecodingOptions.ignore_eos`), so that every request makes the same number of
    tokens, as benchmarks need. `timings`, when given a StepTimings, has every step record its calls and
    seconds there; None (the default) times nothing. Both are plain attributes that whoever owns the
    engine may also set later, between steps.
    """

    def __init__(self, base: BaseModel, prefix_cache_bytes: int = 0, *, cuda_graphs: bool | None = None,
                 pad_shapes: bool | None = None, ignore_eos: bool = False, timings: StepTimings | None = None,
                 kv_cache_bytes: int | None = None, capture: tuple[int, int] = (32, 4096)) -> None:
        self.base = base
        self.ignore_eos = ignore_eos
        self.timings = timings
        self.prefixes: DeviceLru[PrefixKV] = DeviceLru(prefix_cache_bytes, prefix_bytes)
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.device = base.device
        self._embed = self.model.get_input_embeddings()
        # Every end id of the generation config ends a row (Llama 3 Instruct lists three).
        self.eos_ids = frozenset(eos_token_ids(self.model, self.tokenizer))
        # Sliding-window layers need masks in real positions; the model's structure is read once.
        self._masks = MaskLayout.of(self.model)
        shapes = [LayerShape(h, d) for h, d in kv.layer_shapes(self.model)]
        self.pool = KvPool.sized(shapes, DEFAULT_KV_CACHE_BYTES if kv_cache_bytes is None else kv_cache_bytes,
                                 dtype=base.dtype, device=self.device)
        graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._step = DecodeStep(self.model, self._masks, self.pool, pad_shapes=graphs if pad_shapes is None else pad_shapes)
        if graphs:
            # `capture` is (most rows, longest row in tokens) served; a row never outgrows the pool.
            self._step.capture(capture[0], min(capture[1], self.pool.usage().total_tokens))
        self._unseeded = unseeded_generator(self.device)

    def kv_usage(self) -> KvUsage:
        """The KV pool's size and occupancy now (a lock-free read, for ModelInfo and metrics)."""
        return self.pool.usage()

    def start(self, seq: Sequence) -> None:
        """Prepares a row's per-request state (text tracking, sampling generator)."""
        seq.text = TextTracker(self.tokenizer, seq.params.stop)
        seq.generator = seeded_generator(seq.params, self.device)

    @_timed("prefill")
    @torch.inference_mode()
    def prefill(self, sequences: list[Sequence]) -> tuple[Batch, list[TokenEvent]]:
        """Runs `[prompt ; input]` for new rows (prompts from their cached prefix KV) and produces each row's first token.

        Each row first gets blocks for its prefill and its first decode step (KvPoolFullError, holding
        nothing, if the pool is short: the scheduler admits only rows that fit). A row that already
        generated tokens (preempted, its KV dropped) resumes here: it runs `[prompt ; input ; generated]`
        and produces its next token, with its text, stop and sampling state (a seeded row's own
        generator) carried on, so it makes the tokens it would have made.
        """
        try:
            for seq in sequences:
                seq.kv = RowKv(self.pool, seq.kv_tokens)
        except KvPoolFullError:
            for seq in sequences:
                seq.release_kv()
            raise
        logits = self._forward_rows([(s, True, s.input_ids + s.generated) for s in sequences])
        batch = Batch(list(sequences))
        return batch, self._emit(batch, logits)

    @_timed("prefill")
    @torch.inference_mode()
    def prefill_chunk(self, partial: PartialPrefill, positions: int) -> tuple[Batch, list[TokenEvent]] | None:
        """Runs the next `positions` fresh positions of a row's prefill over the KV of those before it.

        The first chunk takes the row's blocks (for its whole prefill and first decode step), writes its
        prompt's cached prefix and runs the prompt's last virtual token and the first tokens; each later
        one continues at its real positions over the row's blocks, so the row's KV is what one whole
        prefill makes. Returns None while tokens are left, and after the last chunk what `prefill`
        returns for the row: its batch and first token.
        """
        if positions < 1:
            raise ValueError(f"a prefill chunk needs at least one position, got {positions}")
        seq, tokens = partial.sequence, partial.tokens
        first = seq.kv is None
        if first:
            seq.kv = RowKv(self.pool, seq.kv_tokens)
            take = positions - fresh_positions(seq.prompt, 0)
        else:
            take = positions
        logits = self._forward_rows([(seq, first, tokens[partial.done:partial.done + take])])
        partial.done = min(len(tokens), partial.done + take)
        if partial.done < len(tokens):
            return None
        batch = Batch([seq])
        return batch, self._emit(batch, logits)

    def _forward_rows(self, rows: list[tuple[Sequence, bool, list[int]]]) -> torch.Tensor:
        """Runs new positions of rows over what their blocks hold; float32 logits [rows, vocab] of each row's last.

        Each row is (sequence, first, tokens): a row's first forward writes its prompt's cached prefix
        (all virtual tokens but the last) into its blocks and runs the last virtual token before its
        tokens; a later one (a chunk) runs just the tokens. Rows are left-padded to a common number of
        queries; padding queries write SCRATCH, and the attended columns are each row's positions.
        """
        firsts = [first for _, first, _ in rows]
        prefixes = self._prefixes([s.prompt if f else None for (s, _, _), f in zip(rows, firsts)],
                                  [s.prompt_key for s, _, _ in rows])
        self._write_prefixes([(s.kv, p) for (s, _, _), p in zip(rows, prefixes) if p is not None])
        heads = [s.prompt[-1:] if f and s.prompt is not None else None for (s, _, _), f in zip(rows, firsts)]
        x = inject.build_inputs(self._embed, heads, [t for _, _, t in rows], padding=inject.LEFT)
        queries = x.embeds.shape[1]
        starts, writes = [], []
        for (seq, _, _), mask in zip(rows, x.attention_mask.tolist()):
            kv_ = seq.kv
            assert kv_ is not None, "a row's blocks are taken before its forward"
            fresh = sum(mask)
            starts.append(kv_.length)
            writes.append([SCRATCH] * (queries - fresh) + kv_.slots(kv_.length, kv_.length + fresh))
            kv_.length += fresh
        start = torch.tensor(starts, device=self.device)[:, None]
        positions = torch.where(x.attention_mask.bool(), x.position_ids + start, 0)
        lengths = [s.kv.length for s, _, _ in rows]  # type: ignore[union-attr]
        width = max(lengths)
        reads = read_slots(self._table([s for s, _, _ in rows]), torch.tensor(lengths, device=self.device), width)
        cache = PagedCache(self.pool, torch.tensor(writes, device=self.device), reads, past=min(starts))
        return kv.forward(self.model, cache, inputs_embeds=x.embeds, position_ids=positions,
                          attention_mask=self._masks.over_positions(positions, width)).logits

    def _write_prefixes(self, rows: list[tuple[RowKv | None, PrefixKV]]) -> None:
        """Copies cached prompt prefixes into the first slots of their rows' blocks (one copy per layer)."""
        if not rows:
            return
        slots = []
        for kv_, prefix in rows:
            assert kv_ is not None
            n = int(prefix[0][0].shape[1])
            slots += kv_.slots(0, n)
            kv_.length = n
        index = torch.tensor(slots, device=self.device)
        for layer, (keys, values) in enumerate(zip(self.pool.keys, self.pool.values)):
            # A prefix's layer is [kv_heads, tokens, head_dim]; the pool's is slot-major.
            keys.index_copy_(0, index, torch.cat([p[layer][0].transpose(0, 1) for _, p in rows]))
            values.index_copy_(0, index, torch.cat([p[layer][1].transpose(0, 1) for _, p in rows]))

    def _table(self, sequences: list[Sequence]) -> torch.Tensor:
        """[rows, blocks] block numbers of the rows (0-padded: columns past a row's length read TRASH anyway)."""
        blocks = [s.kv.blocks for s in sequences]  # type: ignore[union-attr]
        width = max(len(b) for b in blocks)
        return torch.tensor([b + [0] * (width - len(b)) for b in blocks], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def warm(self, prompt: torch.Tensor, key: Key) -> None:
        """Computes and caches a prompt's prefix keys and values ahead of its first request."""
        self._prefixes([prompt], [key])

    def _forward_over_prefixes(self, prompts: list[torch.Tensor | None], keys: list[Key | None],
                               token_ids: list[list[int]],
                               score_last: int | None = None) -> tuple[kv.ForwardOutput, torch.Tensor]:
        """Runs each row's last virtual token and tokens over its prompt's cached prefix; returns the output
        and the attention mask over [prefix columns ; fresh columns].

        Row layout: `[pad][prefix: all virtual tokens but the last][pad][last virtual token ; tokens]`.
        Positions count real tokens only, so padding in either part changes nothing. Prefill keeps the
        last position's logits, scoring the last `score_last` positions' (`kv.forward`).
        """
        prefixes = self._prefixes(prompts, keys)
        lengths = [0 if p is None else int(p[0][0].shape[1]) for p in prefixes]
        width = max(lengths)
        x = inject.build_inputs(self._embed, [None if p is None else p[-1:] for p in prompts], token_ids,
                                padding=inject.LEFT)
        prefix_mask = x.attention_mask.new_zeros(len(prompts), width)
        for row, n in enumerate(lengths):
            prefix_mask[row, width - n:] = 1
        mask = torch.cat([prefix_mask, x.attention_mask], dim=1)
        positions = x.position_ids + torch.tensor(lengths, device=self.device)[:, None]
        cache = self._prefix_cache(prefixes, lengths, width) if width else DynamicCache()
        out = kv.forward(self.model, cache, inputs_embeds=x.embeds,
                         attention_mask=self._masks.prefill(mask, x.embeds.shape[1]), position_ids=positions,
                         score_last=score_last)
        return out, mask

    def _prefixes(self, prompts: list[torch.Tensor | None], keys: list[Key | None]) -> list[PrefixKV | None]:
        """Each row's KV of all but its prompt's last virtual token (which runs with the tokens, so every
        row has a fresh position); cache misses are computed together in one forward."""
        out: list[PrefixKV | None] = [None] * len(prompts)
        missing: dict[Key | int, list[int]] = {}
        for row, (prompt, key) in enumerate(zip(prompts, keys)):
            if prompt is None or prompt.shape[0] < 2:
                continue
            cached = None if key is None else self.prefixes.lookup(key)
            if cached is not None:
                out[row] = cached
            else:
                missing.setdefault(key if key is not None else row, []).append(row)
        if missing:
            heads = [prompts[rows[0]][:-1] for rows in missing.values()]  # type: ignore[index]
            for (key, rows), kv_ in zip(missing.items(), self._compute_prefixes(heads)):
                if not isinstance(key, int):
                    kv_ = self.prefixes.put(key, kv_)
                for row in rows:
                    out[row] = kv_
        return out

    def _compute_prefixes(self, heads: list[torch.Tensor]) -> list[PrefixKV]:
        x = inject.build_inputs(self._embed, heads, [[] for _ in heads])
        out = kv.forward(self.model, DynamicCache(), inputs_embeds=x.embeds,
                         attention_mask=self._masks.prefill(x.attention_mask, x.embeds.shape[1]),
                         position_ids=x.position_ids)
        layers = kv.layers(out.cache)
        # Left-padded: each prompt's positions are the last n columns of its row.
        return [[(k[row, :, x.starts[row]:].clone(), v[row, :, x.starts[row]:].clone()) for k, v in layers]
                for row in range(len(heads))]

    def _prefix_cache(self, prefixes: list[PrefixKV | None], lengths: list[int], width: int) -> DynamicCache:
        """Each row's prefix right-aligned in `width` columns, zeros before it."""
        template = next(p for p in prefixes if p is not None)
        pairs = []
        for layer, (k0, v0) in enumerate(template):
            keys = k0.new_zeros(len(prefixes), k0.shape[0], width, k0.shape[2])
            values = v0.new_zeros(len(prefixes), v0.shape[0], width, v0.shape[2])
            for row, (p, n) in enumerate(zip(prefixes, lengths)):
                if p is not None:
                    keys[row, :, width - n:] = p[layer][0]
                    values[row, :, width - n:] = p[layer][1]
            pairs.append((keys, values))
        return kv.from_layers(pairs)

    @_timed("decode")
    @torch.inference_mode()
    def decode(self, batch: Batch) -> list[TokenEvent]:
        """Advances every row of the batch by one token.

        A row at the end of its last block first takes one more (KvPoolFullError if the pool is short:
        `shortfall` tells the scheduler how many of the newest rows to preempt first). A step that
        raises leaves the rows as they were, blocks taken for it included, so the caller may retry.
        """
        sequences = batch.sequences
        for seq in sequences:
            seq.kv.reserve(seq.kv.length + 1)  # type: ignore[union-attr]
        lengths = [s.kv.length for s in sequences]  # type: ignore[union-attr]
        assert batch.tokens is not None, "a batch decodes after its prefill produced its first tokens"
        logits = self._step(batch.tokens, torch.tensor(lengths, device=self.device), self._table(sequences),
                            max(lengths) + 1)
        for seq in sequences:
            seq.kv.length += 1  # type: ignore[union-attr]
        return self._emit(batch, logits)

    def shortfall(self, batch: Batch) -> int:
        """How many of the batch's newest rows must give their blocks back for its next step to fit the pool."""
        needs = [int(s.kv.length + 1 > s.kv.room) for s in batch.sequences]  # type: ignore[union-attr]
        short, free = sum(needs), self.pool.free_blocks
        dropped = 0
        for seq, need in zip(reversed(batch.sequences), reversed(needs)):
            if short <= free:
                break
            short -= need
            free += len(seq.kv.blocks)  # type: ignore[union-attr]
            dropped += 1
        return dropped

    @torch.inference_mode()
    def score(self, prompts: list[torch.Tensor | None], keys: list[Key | None], contexts: list[list[int]],
              continuations: list[list[int]]) -> list[float]:
        """Each row's total log-probability of its continuation after `[prompt ; context]`, in one forward
        over the prompts' cached prefixes.

        Rows are left-padded, so every continuation ends in the last column and the positions that
        predict continuation tokens are among the last `longest + 1`: only those get logits, never
        the whole vocabulary at every position.
        """
        for p, c in zip(prompts, contexts):
            if (p is None or p.shape[0] == 0) and not c:
                raise ValueError("a continuation needs a prompt or context tokens in front of it")
        longest = max(len(t) for t in continuations)
        out, _ = self._forward_over_prefixes(prompts, keys, [[*c, *t] for c, t in zip(contexts, continuations)],
                                             score_last=longest + 1)
        # Of the kept columns (the last longest + 1), the one predicting a row's first continuation token.
        firsts = [longest - len(t) for t in continuations]
        return inject.gather_continuations(out.logits, firsts, continuations).totals().tolist()

    @_timed("filter")
    @torch.inference_mode()
    def filter(self, batch: Batch, keep: list[int]) -> Batch | None:
        """Keeps the rows at the given indices; None when none remain. A dropped row's blocks are freed: if it
        had not finished, `prefill` resumes it (preemption by recompute)."""
        kept = set(keep)
        for i, seq in enumerate(batch.sequences):
            if i not in kept:
                seq.release_kv()
        if not keep:
            return None
        if len(keep) < len(batch):
            batch.sequences = [batch.sequences[i] for i in keep]
            if batch.tokens is not None:
                batch.tokens = batch.tokens[torch.tensor(keep, device=batch.tokens.device)]
        return batch

    @_timed("concatenate")
    @torch.inference_mode()
    def concatenate(self, batches: list[Batch]) -> Batch:
        """Merges batches into the first: their rows' keys and values stay where they are, in their blocks."""
        target = batches[0]
        for b in batches[1:]:
            target.sequences += b.sequences
            assert target.tokens is not None and b.tokens is not None
            target.tokens = torch.cat([target.tokens, b.tokens])
        return target

    def release(self, sequences: list[Sequence]) -> None:
        """Frees the rows' blocks (rows dropped without `filter`, e.g. all failed at once)."""
        for seq in sequences:
            seq.release_kv()

    def shape_of(self, batch: Batch) -> tuple[int, int]:
        """(rows, attended columns) of the batch's next decode step, padding included."""
        return self._step.shape(len(batch), max(s.kv.length for s in batch.sequences) + 1)  # type: ignore[union-attr]

    @_timed("emit")
    def _emit(self, batch: Batch, logits: torch.Tensor) -> list[TokenEvent]:
        tokens = self._sampler(batch)(logits)
        batch.tokens = tokens
        events = []
        for seq, token in zip(batch.sequences, tokens.tolist()):
            seq.generated.append(token)
            events.append(self._advance(seq, token))
        return events

    def _sampler(self, batch: Batch) -> RowSampler:
        """The batch's RowSampler, built again only when its rows changed since the last step."""
        rows = tuple(batch.sequences)
        built = batch.sampling
        if built is None or len(built[0]) != len(rows) or any(a is not b for a, b in zip(built[0], rows)):
            built = rows, RowSampler([s.params for s in rows], [s.generator for s in rows], self._unseeded,
                                     self.device)
            batch.sampling = built
        return built[1]

    def _advance(self, seq: Sequence, token: int) -> TokenEvent:
        assert seq.text is not None, "Engine.start() must run before a row is scheduled"
        if token in self.eos_ids and not self.ignore_eos:
            seq.finish_reason = FinishReason.EOS
        elif len(seq.generated) >= seq.params.max_new_tokens:
            seq.finish_reason = FinishReason.LENGTH
        text = seq.text.add(token, final=seq.finish_reason is not None)
        if seq.text.stopped_by is not None:
            seq.finish_reason = FinishReason.STOP
        return TokenEvent(seq.request_id, token, text, seq.finish_reason)
