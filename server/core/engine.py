"""The tensor side of serving: prefill and decode steps over a batch of rows with different prompts.

A row's model input is `[prompt ; input]`: the task's soft-prompt vectors followed by the input's
token embeddings. Rows are left-padded to a common length, and positions count real tokens only
(`cumsum(mask) - 1`), so a row computes what it would compute alone: the reference is the base
model's full forward over `[prompt ; input]`, greedy, without a KV cache. A prefix-tuned task's
prompt is keys and values instead (`virtual.KvPrefix`): its reference is PEFT's `PeftModel` forward,
the input over the prefix as cache, at positions after it.

The batch contract follows text-generation-inference: `prefill` builds a batch from new rows,
`decode` advances every row by one token, `filter` drops finished rows and `concatenate` merges
batches, which lets the scheduler add and remove rows between any two steps.

Every row's keys and values live in its own blocks of the KV pool (`pool`), sized once at startup:
a prefill writes a row's prompt prefix and fresh positions there, each decode step one more token,
and a row leaving frees only its blocks. `filter` and `concatenate` move no keys or values at all.
A row longer than the scheduler's prefill budget is prefilled in chunks (`prefill_chunk`) straight
into its blocks; it joins a batch once its whole input is in.

Where the CPU's paged kernel runs, forwards are ragged instead of padded: every new position of every
row is one query of a single row, attending to its own row's blocks up to its position, so decode rows,
arriving rows and a chunk share one forward (`step`) and no position is padding.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

from softprompt.prompts import inject
from softprompt.prompts.outcomes import FinishReason
from softprompt.prompts.tokens import eos_token_ids
from softprompt.server.core import kv, paged_attention, virtual
from softprompt.server.core.decode_step import DecodeStep
from softprompt.server.core.forward import Fresh, PoolForward
from softprompt.server.core.masks import MaskLayout
from softprompt.server.core.model import BaseModel
from softprompt.server.core.kv_manager import KvManager, RowBlocks
from softprompt.server.core.packed_linear import pack_linears, packing_available
from softprompt.server.core.pool import KvPool, KvPoolFullError, LayerShape
from softprompt.server.core.prompt_cache import DeviceLru, Key, PrefixKV, prefix_bytes
from softprompt.server.core.rows import Batch, PartialPrefill, ScoreRow, Sequence, TokenEvent
from softprompt.server.core.sampling import RowSampler, seeded_generator, unseeded_generator
from softprompt.server.core.text import TextTracker
from softprompt.server.core.types import KvUsage
from softprompt.server.core.virtual import Prompt

log = logging.getLogger(__name__)


DEFAULT_KV_CACHE_BYTES = 2 << 30  # an Engine built without a budget (tests, benchmarks): 2 GiB, backed as used

# The parts of a step a StepTimings totals; `mixed` is a step whose one forward also prefills (`Engine.step`);
# `emit` (choosing the next tokens, detokenizing) runs inside prefill, decode and mixed.
STEP_PARTS = ("prefill", "decode", "mixed", "emit", "filter", "concatenate")


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
    """Runs prefill, decode and scoring forwards on the frozen base model, every one over the KV pool.

    Every forward is the same: rows' new positions are written into their own blocks of the pool and
    attend to what those blocks hold (`forward.PoolForward`). The keys and values of a prompt's virtual tokens
    depend on nothing but the prompt, so they are kept once computed (`prefixes`, LRU in bytes): a
    row whose prompt's prefix is cached gets it copied into its first blocks and runs only its last
    virtual token and its tokens; a row whose prefix is not cached runs the whole prompt in its own
    forward, and the KV it wrote becomes the cached prefix. Either way the result is what running
    `[prompt ; input]` whole computes. A prompt's prefix is thus "blocks written into a row", whatever
    produced them: a prefix-tuned prompt (`virtual.KvPrefix`) is keys and values already, written into the
    row's first blocks with nothing run for them. How each kind of prompt fills its positions is
    `virtual`'s to say (`_first` asks it), so rows of any mix of methods share every forward.

    The engine reads block tables; it decides nothing about blocks. The scheduler gets rows their
    blocks from the KV manager (`kv`) before it runs them; a row that lacks them here (a caller using
    the engine directly) gets them from the same manager, or KvPoolFullError.

    `cuda_graphs` (default: on for CUDA devices) replays decode steps from captured graphs;
    `pad_shapes` (default: as `cuda_graphs`) runs steps at the graphs' bucketed shapes, which tests
    use on CPU to check that padding changes no token.

    `packed_linears` (default: on where `packed_linear.packing_available`, a CPU in float32) packs the
    model's linear weights for oneDNN once (`packed_linear`), which the engine's forwards then use.
    `paged_kernel` (default: on where `paged_attention.kernel_available`, a CPU in float32 with SDPA
    attention) has forwards attend over the pool's blocks in place instead of gathering them; with it,
    `mixed_steps` (default on) runs forwards ragged (`forward.PoolForward.ragged`: every position of every row as one
    row of queries, no padding), and `step` prefills arriving rows in the decode step's own forward.

    `ignore_eos` keeps a row generating past end-of-sequence tokens until `max_new_tokens` or a stop
    string (as vLLM's `SamplingParams.ignore_eos`), so that every request makes the same number of
    tokens, as benchmarks need. `timings`, when given a StepTimings, has every step record its calls and
    seconds there; None (the default) times nothing. Both are plain attributes that whoever owns the
    engine may also set later, between steps.
    """

    def __init__(self, base: BaseModel, prefix_cache_bytes: int = 0, *, cuda_graphs: bool | None = None,
                 pad_shapes: bool | None = None, ignore_eos: bool = False, timings: StepTimings | None = None,
                 kv_cache_bytes: int | None = None, capture: tuple[int, int] = (32, 4096),
                 packed_linears: bool | None = None, paged_kernel: bool | None = None,
                 mixed_steps: bool = True) -> None:
        self.base = base
        self.ignore_eos = ignore_eos
        self.timings = timings
        self.prefixes: DeviceLru[PrefixKV] = DeviceLru(prefix_cache_bytes, prefix_bytes)
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.device = base.device
        self._embed = self.model.get_input_embeddings()
        self.packed_linears = packing_available(self.device, base.dtype) if packed_linears is None else packed_linears
        if self.packed_linears:
            pack_linears(self.model)
        # Every end id of the generation config ends a row (Llama 3 Instruct lists three).
        self.eos_ids = frozenset(eos_token_ids(self.model, self.tokenizer))
        # Sliding-window layers need masks in real positions; the model's structure is read once.
        self._masks = MaskLayout.of(self.model)
        shapes = [LayerShape(h, d) for h, d in kv.layer_shapes(self.model)]
        self.pool = KvPool.sized(shapes, DEFAULT_KV_CACHE_BYTES if kv_cache_bytes is None else kv_cache_bytes,
                                 dtype=base.dtype, device=self.device)
        self.kv = KvManager(self.pool)
        graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        impl = getattr(self.model.config, "_attn_implementation", None)
        kernel = None
        if paged_attention.kernel_available(self.device, base.dtype, impl) if paged_kernel is None else paged_kernel:
            kernel = paged_attention.load_kernel()
            paged_attention.install()
        self._step = DecodeStep(self.model, self._masks, self.pool, pad_shapes=graphs if pad_shapes is None else pad_shapes,
                                packed=self.packed_linears, kernel=kernel)
        # With the kernel, forwards run ragged, and a step can prefill arriving rows in the decode step's own forward.
        self.forwards = PoolForward(self.model, self.pool, self._masks, self.prefixes, packed=self.packed_linears,
                                    kernel=kernel, ragged=not graphs and mixed_steps)
        if graphs:
            # `capture` is (most rows, longest row in tokens) served; a row never outgrows the pool.
            self._step.capture(capture[0], min(capture[1], self.kv.capacity_tokens))
        self._unseeded = unseeded_generator(self.device)

    @property
    def fuses_steps(self) -> bool:
        """Whether `step` runs arriving rows' prefill and chunks in the decode step's forward (ragged, through the
        paged kernel); False: callers prefill apart from decode steps."""
        return self.forwards.is_ragged

    def kv_usage(self) -> KvUsage:
        """The KV pool's size and occupancy now (a lock-free read, for ModelInfo and metrics)."""
        return self.kv.usage()

    def start(self, seq: Sequence) -> None:
        """Prepares a row's per-request state (text tracking, sampling generator)."""
        seq.text = TextTracker(self.tokenizer, seq.params.stop)
        seq.generator = seeded_generator(seq.params, self.device)

    def joining_positions(self, seq: Sequence) -> int:
        """Positions a waiting row computes to join the batch: one if it is parked, else its first forward's."""
        return 1 if seq.resumes_in_place else self.fresh_positions(seq.prompt, seq.prompt_key, len(seq.tokens))

    def fresh_positions(self, prompt: Prompt | None, key: Key | None, tokens: int) -> int:
        """Positions a row's first forward computes for `tokens` tokens after `prompt`: the tokens, after the
        prompt's last virtual token if its prefix is cached, the whole prompt if not, and nothing of a
        prefix of keys and values (`virtual.fresh_virtual`)."""
        return virtual.fresh_virtual(prompt, key, self.prefixes) + tokens

    # ------------------------------------------------------------------ generation

    @_timed("prefill")
    @torch.inference_mode()
    def prefill(self, sequences: list[Sequence]) -> tuple[Batch, list[TokenEvent]]:
        """Runs `[prompt ; input]` for new rows and produces each row's first token.

        Each row holds (or gets) blocks for its prefill and first decode step. A row that already
        generated tokens resumes here: preempted with its KV dropped, it runs `[prompt ; input ; generated]`;
        parked with its KV kept, its last token; either way it produces its next token with its text, stop
        and sampling state (a seeded row's own generator) carried on, so it makes the tokens it would have made.
        """
        self._hold([(s.kv, s.kv_tokens) for s in sequences])
        logits = self.forwards.run([self._join(s) for s in sequences])
        batch = Batch(list(sequences))
        return batch, self._emit(batch, logits)

    @_timed("prefill")
    @torch.inference_mode()
    def prefill_chunk(self, partial: PartialPrefill, positions: int) -> tuple[Batch, list[TokenEvent]] | None:
        """Runs the next `positions` fresh positions of a row's prefill over the KV of those before it.

        The first chunk (the row holds, or gets, blocks for its whole prefill and first decode step)
        plans the row's first forward as `prefill` does: its prompt's cached prefix copied in, or the
        whole prompt run fresh. Each chunk runs the next positions of that plan at their real
        positions over the row's blocks, so the row's KV is what one whole prefill makes. Returns None
        while positions are left, and after the last chunk what `prefill` returns for the row: its
        batch and first token.
        """
        row, stop, last = self._chunk(partial, positions)
        logits = self.forwards.run([row])
        partial.done = stop
        if not last:
            return None
        batch = Batch([partial.sequence])
        return batch, self._emit(batch, logits)

    def _chunk(self, partial: PartialPrefill, positions: int) -> tuple[Fresh, int, bool]:
        """The next chunk of a row's prefill as one row of a forward, the position it stops at and whether it is
        the last; the first chunk takes the row's blocks and plans its whole prefill (`partial.plan`)."""
        if positions < 1:
            raise ValueError(f"a prefill chunk needs at least one position, got {positions}")
        seq = partial.sequence
        first = partial.plan is None
        if partial.plan is None:
            self._hold([(seq.kv, seq.kv_tokens)])
            partial.plan = self._first(seq.kv, seq.prompt, seq.prompt_key, seq.tokens)
        plan, start, total = partial.plan, partial.done, partial.total
        assert total is not None
        stop = min(start + positions, total)
        virtual = 0 if plan.head is None else int(plan.head.shape[0])
        head = plan.head[start:stop] if plan.head is not None and start < virtual else None
        row = Fresh(seq.kv, head, plan.tokens[max(0, start - virtual):max(0, stop - virtual)],
                     prefix=plan.prefix if first else None,
                     # The prompt's prefix is kept by the chunk that completes it.
                     keep=plan.keep if start < plan.keep_tokens <= stop else None, keep_tokens=plan.keep_tokens)
        return row, stop, stop == total

    @_timed("decode")
    @torch.inference_mode()
    def decode(self, batch: Batch) -> list[TokenEvent]:
        """Advances every row of the batch by one token.

        Each row holds (or gets: KvPoolFullError when the pool is short) room for its new token. A
        step that raises leaves the rows as they were, so the caller may retry.
        """
        sequences = batch.sequences
        self._hold([(s.kv, s.kv.length + 1) for s in sequences])
        lengths = [s.kv.length for s in sequences]
        assert batch.tokens is not None, "a batch decodes after its prefill produced its first tokens"
        logits = self._step(batch.tokens, torch.tensor(lengths, device=self.device),
                            self.forwards.table([s.kv for s in sequences]), max(lengths) + 1)
        for seq in sequences:
            seq.kv.length += 1
        return self._emit(batch, logits)

    @_timed("mixed")
    @torch.inference_mode()
    def step(self, batch: Batch | None, new: list[Sequence], chunk: PartialPrefill | None = None,
             chunk_positions: int = 0) -> tuple[Batch | None, list[TokenEvent]]:
        """One forward for everything a step runs (`fuses_steps` engines): the batch's rows decode a token, arriving
        rows (`new`) run their prefill and produce their first token, and a row being prefilled in chunks runs its
        next `chunk_positions` positions (its first token too, when that was its last chunk), all as one ragged
        row of queries through the paged kernel, so the weights are read once for all of it.

        Returns the batch of every row that produced a token (the batch's rows, then the new ones, then the
        chunked row if it completed), or None if there is none, and their events. A step that raises leaves every
        row as it was (blocks kept), so the caller may run the same work apart instead.
        """
        running = [] if batch is None else list(batch.sequences)
        self._hold([(s.kv, s.kv.length + 1) for s in running] + [(s.kv, s.kv_tokens) for s in new])
        rows = [Fresh(s.kv, None, [s.generated[-1]]) for s in running]
        rows += [self._join(s) for s in new]
        wanted = [True] * len(rows)
        planned, stop, last = chunk is not None and chunk.plan is not None, 0, False
        if chunk is not None:
            row, stop, last = self._chunk(chunk, chunk_positions)
            rows.append(row)
            wanted.append(last)
        if not rows:
            return None, []
        lengths = [r.kv.length for r in rows]
        try:
            logits = self.forwards.ragged(rows, wanted)
        except BaseException:
            for row, length in zip(rows, lengths):
                row.kv.length = length
            if chunk is not None and not planned:
                chunk.plan = None
            raise
        sequences = running + list(new)
        if chunk is not None:
            chunk.done = stop
            if last:
                sequences.append(chunk.sequence)
        if not sequences:
            return None, []
        merged = batch if batch is not None else Batch([])
        merged.sequences = sequences
        return merged, self._emit(merged, logits)

    # ------------------------------------------------------------------ scoring and warming

    @torch.inference_mode()
    def score(self, rows: list[ScoreRow]) -> list[float]:
        """Each row's total log-probability of its continuation after `[prompt ; context]`, in one forward
        over the pool; the rows' blocks are given back when it returns.

        Rows are left-padded, so every continuation ends in the last column and the positions that
        predict continuation tokens are among the last `longest + 1`: only those get logits, never
        the whole vocabulary at every position.
        """
        for row in rows:
            if not virtual.predicts_first_token(row.prompt) and not row.context:
                raise ValueError("a continuation needs a prompt or context tokens in front of it (a prompt of "
                                 "virtual tokens: a prefix of keys and values predicts nothing)")
        try:
            self._hold([(r.kv, r.kv_tokens) for r in rows])
            longest = max(len(r.continuation) for r in rows)
            logits = self.forwards.run([self._first(r.kv, r.prompt, r.key, r.tokens) for r in rows],
                                   score_last=longest + 1)
        finally:
            for row in rows:
                self.kv.free(row.kv)
        # Of the kept columns (the last longest + 1), the one predicting a row's first continuation token.
        firsts = [longest - len(r.continuation) for r in rows]
        return inject.gather_continuations(logits, firsts, [r.continuation for r in rows]).totals().tolist()

    @torch.inference_mode()
    def warm(self, prompts: list[tuple[Prompt, Key]], *, spare_only: bool = False) -> int:
        """Computes and caches prompts' prefix keys and values ahead of their first requests, in one forward
        over blocks borrowed from the pool; returns how many prompts now have theirs cached (a prefix of keys
        and values, or a one-token prompt, needs nothing computed). A prompt the pool has no room for now, or
        with `spare_only` one whose prefix the cache could keep only by evicting another, is left to its first
        request, which computes it in its own forward."""
        rows, done, planned = [], 0, 0
        per_token = KvPool.bytes_per_token(self.pool.layers, self.pool.dtype)
        try:
            for prompt, key in prompts:
                keep = virtual.prefix_to_compute(prompt, key, self.prefixes)
                if not keep:
                    done += 1
                    continue
                if spare_only and not self.prefixes.has_room(planned + keep * per_token):
                    continue
                planned += keep * per_token
                row = RowBlocks(transient=True)
                if self.kv.allocate_slots(row, keep) is None:
                    continue
                assert isinstance(prompt, torch.Tensor)  # keys and values (a KvPrefix) have nothing to compute
                rows.append(Fresh(row, prompt[:keep], [], keep=key, keep_tokens=keep))
            if rows:
                self.forwards.run(rows)
        finally:
            for row in rows:
                self.kv.free(row.kv)
        return done + len(rows)

    # ------------------------------------------------------------------ one forward over the pool

    def _hold(self, rows: list[tuple[RowBlocks, int]]) -> None:
        """Makes sure each row holds room for its tokens, asking the KV manager for what it lacks;
        KvPoolFullError (giving back what this call took) when the pool cannot."""
        grown: list[RowBlocks] = []
        for row, tokens in rows:
            had = bool(row.blocks)
            taken = self.kv.allocate_slots(row, tokens)
            if taken is None:
                for g in grown:
                    self.kv.free(g)
                raise KvPoolFullError(f"the KV pool has no room for a row of {tokens} tokens now "
                                      f"({self.kv.usage().free_tokens} token slots free)")
            if taken and not had:
                grown.append(row)

    def _join(self, seq: Sequence) -> Fresh:
        """What a joining row computes: a parked row its last token over the KV it kept, any other its first
        forward (a resumed one's generated tokens included)."""
        if seq.resumes_in_place:
            return Fresh(seq.kv, None, [seq.generated[-1]])
        return self._first(seq.kv, seq.prompt, seq.prompt_key, seq.tokens)

    def _first(self, row: RowBlocks, prompt: Prompt | None, key: Key | None, tokens: list[int]) -> Fresh:
        """A row's first forward, as its prompt says (`virtual.first_forward`): keys and values copied into its
        first blocks (a cached prompt prefix, or a prefix-tuned prompt's own), then whatever of the prompt
        runs fresh (its last virtual token, or the whole prompt, kept as the prefix) and its tokens."""
        if not tokens and not virtual.predicts_first_token(prompt):
            raise ValueError("a row needs tokens of its own unless virtual tokens run in front of them")
        plan = virtual.first_forward(prompt, key, self.prefixes)
        return Fresh(row, plan.head, tokens, prefix=plan.prefix, keep=key if plan.keep_tokens else None,
                      keep_tokens=plan.keep_tokens)

    # ------------------------------------------------------------------ batches

    @_timed("filter")
    @torch.inference_mode()
    def filter(self, batch: Batch, keep: list[int]) -> Batch | None:
        """Keeps the rows at the given indices; None when none remain. A dropped row's blocks are given
        back: if it had not finished, `prefill` resumes it (preemption by recompute)."""
        kept = set(keep)
        for i, seq in enumerate(batch.sequences):
            if i not in kept:
                self.kv.free(seq.kv)
        return self._select(batch, keep)

    @torch.inference_mode()
    def set_aside(self, batch: Batch, index: int) -> Batch | None:
        """Takes one unfinished row out of the batch, its blocks parked with the KV manager: it rejoins
        (`prefill`, `step`) with one query while it keeps them, by recompute if the pool took them back."""
        self.kv.park(batch.sequences[index].kv)
        return self._select(batch, [i for i in range(len(batch)) if i != index])

    def _select(self, batch: Batch, keep: list[int]) -> Batch | None:
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
        """Gives the rows' blocks back (rows dropped without `filter`: preempted, failed or abandoned)."""
        for seq in sequences:
            self.kv.free(seq.kv)

    def shape_of(self, batch: Batch) -> tuple[int, int]:
        """(rows, attended columns) of the batch's next decode step, padding included."""
        return self._step.shape(len(batch), max(s.kv.length for s in batch.sequences) + 1)

    # ------------------------------------------------------------------ tokens

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

