"""The tensor side of serving: prefill and decode steps over a batch of rows with different prompts.

A row's model input is `[prompt ; input]`: the task's soft-prompt vectors followed by the input's
token embeddings. Rows are left-padded to a common length, and positions count real tokens only
(`cumsum(mask) - 1`), so a row computes what it would compute alone: the reference is the base
model's full forward over `[prompt ; input]`, greedy, without a KV cache.

The batch contract follows text-generation-inference: `prefill` builds a batch from new rows,
`decode` advances every row by one token, `filter` drops finished rows and `concatenate` merges
batches, which lets the scheduler add and remove rows between any two steps.

A row longer than the scheduler's prefill budget is prefilled in chunks (`prefill_chunk`), its
partial KV kept in a `PartialPrefill` between them; it joins a batch once its whole input is in.

Decoding rows keep their keys and values in a preallocated `KvArena` that each step writes one
column of in place; the running batch's arena outlives the batch, so its buffers (and, on a GPU,
the CUDA graphs captured on them) serve the next batch too.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch
from transformers import DynamicCache

from softprompt.prompts import inject
from softprompt.prompts.outcomes import FinishReason
from softprompt.prompts.tokens import eos_token_ids
from softprompt.server.core import kv
from softprompt.server.core.arena import KvArena, power_of_two
from softprompt.server.core.decode_step import DecodeStep
from softprompt.server.core.masks import MaskLayout
from softprompt.server.core.model import BaseModel
from softprompt.server.core.prompt_cache import DeviceLru, Key, PrefixKV, prefix_bytes
from softprompt.server.core.sampling import RowSampler, SamplingParams, seeded_generator, unseeded_generator
from softprompt.server.core.text import TextTracker


@dataclass
class Sequence:
    """One request's row: its inputs, its sampling state and what it has produced."""

    request_id: int
    input_ids: list[int]
    params: SamplingParams
    prompt: torch.Tensor | None = None  # [num_virtual_tokens, hidden] on the model's device and dtype
    prompt_key: Key | None = None  # (task, version, sha256): its prefix KV is cached under this key
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    text: TextTracker | None = None
    generator: torch.Generator | None = None  # a seeded sampled row's own; unseeded rows share the engine's

    @property
    def num_virtual_tokens(self) -> int:
        """Soft-prompt positions in front of the input."""
        return 0 if self.prompt is None else int(self.prompt.shape[0])

    @property
    def length(self) -> int:
        """Positions this row occupies before generation."""
        return self.num_virtual_tokens + len(self.input_ids)


def fresh_positions(prompt: torch.Tensor | None, tokens: int) -> int:
    """Positions a prefill or scoring forward computes for a row of `tokens` tokens after `prompt`: the
    prompt's last virtual token and the tokens; the rest of the prompt is its cached prefix's KV."""
    return (0 if prompt is None else min(1, int(prompt.shape[0]))) + tokens


@dataclass
class PartialPrefill:
    """A row being prefilled in chunks: the KV of its first `done` tokens (after its prompt), kept between chunks."""

    sequence: Sequence
    done: int = 0
    cache: DynamicCache | None = None  # [prompt prefix ; last virtual token ; tokens[:done]]
    mask: torch.Tensor | None = None  # [1, columns]: the cache's real columns

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
    """Rows decoding together; their keys, values, mask, positions and next inputs live in `kv`.

    A batch is changed in place by `decode`, `filter` and `concatenate`.
    """

    sequences: list[Sequence]
    kv: KvArena
    # The rows' sampler and the rows it was built for: rebuilt only when rows join or leave.
    sampling: tuple[tuple[Sequence, ...], RowSampler] | None = None

    def __len__(self) -> int:
        return len(self.sequences)


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
    string (as vLLM's `SamplingParams.ignore_eos`), so that every request makes the same number of
    tokens, as benchmarks need. `timings`, when given a StepTimings, has every step record its calls and
    seconds there; None (the default) times nothing. Both are plain attributes that whoever owns the
    engine may also set later, between steps.
    """

    def __init__(self, base: BaseModel, prefix_cache_bytes: int = 0, *, cuda_graphs: bool | None = None,
                 pad_shapes: bool | None = None, ignore_eos: bool = False,
                 timings: StepTimings | None = None) -> None:
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
        graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # Sliding-window layers need masks in real positions; the model's structure is read once.
        self._masks = MaskLayout.of(self.model)
        self._step = DecodeStep(self.model, self._masks, graphs=graphs, pad_shapes=pad_shapes)
        # The running batch's arena, kept across batches so its buffers (and graphs captured on
        # them) are reused; `_resident_owner` is the batch using it, if that batch is still alive.
        self._resident: KvArena | None = None
        self._resident_owner: weakref.ref[Batch] | None = None
        self._unseeded = unseeded_generator(self.device)

    def start(self, seq: Sequence) -> None:
        """Prepares a row's per-request state (text tracking, sampling generator)."""
        seq.text = TextTracker(self.tokenizer, seq.params.stop)
        seq.generator = seeded_generator(seq.params, self.device)

    @_timed("prefill")
    @torch.inference_mode()
    def prefill(self, sequences: list[Sequence]) -> tuple[Batch, list[TokenEvent]]:
        """Runs `[prompt ; input]` for new rows (prompts from their cached prefix KV) and produces each row's first token.

        A row that already generated tokens (preempted by `filter`, its KV dropped) resumes here: it runs
        `[prompt ; input ; generated]` and produces its next token, with its text, stop and sampling
        state (a seeded row's own generator) carried on, so it makes the tokens it would have made.

        Row layout: `[pad][prefix: all virtual tokens but the last][pad][last virtual token ; input]`.
        The prefix columns come from the cache; the forward covers the rest, with positions counting
        real tokens only, so padding in either part changes nothing.
        """
        prompts = [s.prompt for s in sequences]
        # A resumed row (preempted: its KV dropped) recomputes its generated tokens as input too.
        out, mask = self._forward_over_prefixes(prompts, [s.prompt_key for s in sequences],
                                                [s.input_ids + s.generated for s in sequences])
        if not bool(mask.all()):
            kv.zero_masked(out.cache, mask)
        batch = Batch(list(sequences), KvArena.wrap(kv.layers(out.cache), mask, positions=mask.sum(-1)))
        return batch, self._emit(batch, out.logits)

    @_timed("prefill")
    @torch.inference_mode()
    def prefill_chunk(self, partial: PartialPrefill, positions: int) -> tuple[Batch, list[TokenEvent]] | None:
        """Runs the next `positions` fresh positions of a row's prefill over the KV of those before it.

        The first chunk is the prompt's last virtual token and the first tokens, over the prompt's cached
        prefix; each later one continues at its real positions, its mask (windows included) over every
        column before it, so the row's KV is what one whole prefill makes. Returns None while tokens are
        left, and after the last chunk what `prefill` returns for the row: its batch and first token.
        """
        if positions < 1:
            raise ValueError(f"a prefill chunk needs at least one position, got {positions}")
        seq, tokens = partial.sequence, partial.tokens
        if partial.cache is None:
            take = positions - fresh_positions(seq.prompt, 0)
            out, mask = self._forward_over_prefixes([seq.prompt], [seq.prompt_key], [tokens[:take]])
        else:
            assert partial.mask is not None
            take = positions
            chunk = tokens[partial.done:partial.done + take]
            x = inject.build_inputs(self._embed, [None], [chunk], padding=inject.LEFT)
            mask = torch.cat([partial.mask, x.attention_mask], dim=1)
            out = kv.forward(self.model, partial.cache, inputs_embeds=x.embeds,
                             attention_mask=self._masks.prefill(mask, len(chunk)),
                             position_ids=x.position_ids + partial.mask.sum(-1, keepdim=True))
        partial.cache, partial.mask, partial.done = out.cache, mask, min(len(tokens), partial.done + take)
        if partial.done < len(tokens):
            return None
        partial.cache = partial.mask = None  # the batch owns the KV now
        if not bool(mask.all()):
            kv.zero_masked(out.cache, mask)
        batch = Batch([seq], KvArena.wrap(kv.layers(out.cache), mask, positions=mask.sum(-1)))
        return batch, self._emit(batch, out.logits)

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
        """Advances every row of the batch by one token."""
        self._make_resident(batch)
        try:
            logits = self._step(batch.kv, graph_ok=batch.kv is self._resident)
        except BaseException:
            # The batch stays as before the step, so the caller may drop rows and retry.
            batch.kv.undo_step()
            raise
        batch.kv.advance()
        return self._emit(batch, logits)

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
        """Keeps the rows at the given indices; None when none remain. A dropped row's KV is gone: if it had
        not finished, `prefill` resumes it (preemption by recompute)."""
        if not keep:
            batch.kv.keep([])
            return None
        if len(keep) < len(batch):
            batch.sequences = [batch.sequences[i] for i in keep]
            batch.kv.keep(keep)
        return batch

    @_timed("concatenate")
    @torch.inference_mode()
    def concatenate(self, batches: list[Batch]) -> Batch:
        """Merges batches into one (the resident one, if among them), right-aligning their rows."""
        target = next((b for b in batches if b.kv is self._resident), batches[0])
        if len(batches) == 1:
            return target
        self._make_resident(target, others=[b for b in batches if b is not target])
        for b in batches:
            if b is not target:
                target.kv.absorb(b.kv, self._columns_needed(target.sequences + b.sequences))
                target.sequences += b.sequences
        return target

    def _make_resident(self, batch: Batch, others: list[Batch] | None = None) -> None:
        """Moves a prefill's rows into the long-lived arena (or, while another batch holds it, a new one)."""
        if batch.kv is self._resident:
            return
        others = others or []
        owner = None if self._resident_owner is None else self._resident_owner()
        rows = len(batch) + sum(len(b) for b in others)
        need = self._columns_needed(batch.sequences + [s for b in others for s in b.sequences])
        if owner is None:
            if self._resident is None:
                self._resident = KvArena.empty(batch.kv, power_of_two(rows), batch.kv.t + need)
            arena = self._resident
            arena.clear()
            self._resident_owner = weakref.ref(batch)
        else:
            arena = KvArena.empty(batch.kv, rows, batch.kv.t + need)
        arena.absorb(batch.kv, need)
        batch.kv = arena

    def shape_of(self, batch: Batch) -> tuple[int, int]:
        """(rows, attended columns) of the batch's next decode step, padding included."""
        return self._step.shape(batch.kv)

    @staticmethod
    def _columns_needed(sequences: list[Sequence]) -> int:
        """Most columns any of the rows may still write: one per decode step left."""
        return max(s.params.max_new_tokens - len(s.generated) for s in sequences)

    @_timed("emit")
    def _emit(self, batch: Batch, logits: torch.Tensor) -> list[TokenEvent]:
        tokens = self._sampler(batch)(logits)
        batch.kv.tokens[:len(batch)] = tokens
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
