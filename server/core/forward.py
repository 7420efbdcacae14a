"""One forward over the KV pool: rows' new positions written into their blocks, attending to what those hold.

A row of a forward (`Fresh`) is the positions it computes now, after what its blocks hold: a head of
virtual-token embeddings, then tokens; a prefix of keys and values may be copied into its first slots
first, and the KV its first positions write may be kept as a prompt's cached prefix after.

Two ways to run rows, with the same results (to the last bits of the summation order):

- padded (`padded`): rows left-padded to a common number of queries, each row's keys and values
  gathered per layer in position order (or, on a decode step, read in place by the paged kernel);
- ragged (`ragged`, where the CPU's paged kernel runs): every new position of every row as one query of
  a single row, attending to its own row's blocks up to its position; no padding, so decode rows (one
  query each), arriving rows and a chunk of a long prefill share one forward (`Engine.step`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType

import torch
from transformers import PreTrainedModel

from softprompt.prompts import inject
from softprompt.server.core import kv, paged_attention
from softprompt.server.core.kv_manager import RowBlocks
from softprompt.server.core.masks import MaskLayout
from softprompt.server.core.paged_cache import SEGMENT_WORK, InPlace, PagedCache, Segment, read_slots
from softprompt.server.core.pool import SCRATCH, KvPool
from softprompt.server.core.prompt_cache import DeviceLru, Key, PrefixKV

log = logging.getLogger(__name__)


@dataclass
class Fresh:
    """One row of a forward over the pool: the positions it computes now, after what its blocks hold.

    `head` is virtual-token embeddings run before the tokens: a prompt's last one over its cached
    `prefix`, or the whole prompt when its prefix is not cached; then `keep` names the cache entry that
    the KV of its first `keep_tokens` positions (all virtual tokens but the last) becomes after the forward.
    """

    kv: RowBlocks
    head: torch.Tensor | None
    tokens: list[int]
    prefix: PrefixKV | None = None  # keys and values copied into the row's first slots before the forward: a
    # prompt-tuned prompt's cached prefix, or a prefix-tuned prompt's own
    keep: Key | None = None
    keep_tokens: int = 0

    @property
    def positions(self) -> int:
        """Positions the row computes now: its head's virtual tokens, then its tokens."""
        return (0 if self.head is None else int(self.head.shape[0])) + len(self.tokens)


class PoolForward:
    """Runs rows' forwards over the pool for the engine: `run` (padded or ragged, as set up), and the prefix copies."""

    def __init__(self, model: PreTrainedModel, pool: KvPool, masks: MaskLayout, prefixes: DeviceLru[PrefixKV], *,
                 packed: bool, kernel: ModuleType | None, ragged: bool) -> None:
        self.model = model
        self.pool = pool
        self.masks = masks
        self.prefixes = prefixes  # where a row's `keep` puts the prefix KV it computed
        self.packed = packed  # linear layers run on their packed weights (packed_linear)
        self.kernel = kernel  # the paged attention kernel, if built
        self.is_ragged = ragged and kernel is not None  # forwards run ragged; False after a model proves it cannot
        self.embed = model.get_input_embeddings()
        self.device = pool.device

    def run(self, rows: list[Fresh], score_last: int | None = None) -> torch.Tensor:
        """Runs rows' new positions over what their blocks hold: float32 logits [rows, vocab] of each row's
        last position, or with `score_last` the last that many positions' [rows, score_last, vocab].

        Ragged where the paged kernel runs mixed steps (`ragged`), else padded (`padded`).
        """
        if self.is_ragged and score_last is None:
            return self.ragged(rows)
        return self.padded(rows, score_last)

    def ragged(self, rows: list[Fresh], wanted: list[bool] | None = None) -> torch.Tensor:
        """Runs rows' new positions as one row of queries, each query attending to its own row's blocks up to its
        position (the paged kernel, one kernel row per query): no padding, whatever the rows' lengths, so decode
        rows (one query each) and prefills share a forward. float32 logits [wanted rows, vocab] of the last
        position of each row `wanted` marks (default: every row).

        A model whose attention the kernel does not cover (`paged_attention.NotCovered`) has its forwards padded
        from then on; this one too.
        """
        self.write_prefixes([(r.kv, r.prefix) for r in rows if r.prefix is not None])
        wanted = [True] * len(rows) if wanted is None else wanted
        x, positions, writes, owner, last = self._ragged_inputs(rows, wanted)
        device = self.device
        at = torch.tensor(positions, device=device)
        table = self.table([r.kv for r in rows]).index_select(0, torch.tensor(owner, device=device))
        lengths = at + 1
        segments = self._segments(rows, at)
        for seg in segments:
            lengths[seg.start:seg.stop] = 0  # the kernel skips them
        assert self.kernel is not None
        cache = PagedCache(self.pool, torch.tensor(writes, device=device), None,
                           in_place=InPlace(self.kernel, table, lengths, self.masks.window_of, ragged=True,
                                            segments=segments))
        try:
            with paged_attention.fused(cache):
                # The kernel reads block tables, not masks: the model gets a mask of the shape it expects.
                out = kv.forward(self.model, cache, inputs_embeds=x[None], position_ids=at[None],
                                 attention_mask=self.masks.over_positions(at[None], 1),
                                 # (A forward whose logits nobody wants, a chunk's, still asks for one position's.)
                                 keep=torch.tensor(last or [len(positions) - 1], device=device),
                                 packed=self.packed)
        except paged_attention.NotCovered as exc:
            log.warning("%s: this model's forwards run padded from now on", exc)
            self.is_ragged = False
            logits = self.padded(rows)
            return logits[torch.tensor([i for i, w in enumerate(wanted) if w], device=device)]
        for row in rows:
            row.kv.length += row.positions
        self._keep_prefixes(rows)
        return out.logits[:len(last)]

    def _segments(self, rows: list[Fresh], positions: torch.Tensor) -> tuple[Segment, ...]:
        """The rows of a ragged forward whose queries x attended positions exceed SEGMENT_WORK: attended by SDPA."""
        segments, at = [], 0
        for row in rows:
            fresh = row.positions
            width = row.kv.length + fresh
            if fresh > 1 and fresh * width > SEGMENT_WORK:
                slots = torch.tensor(row.kv.slots(0, width), device=self.device)
                segments.append(Segment(at, at + fresh, slots, positions[at:at + fresh]))
            at += fresh
        return tuple(segments)

    def _ragged_inputs(self, rows: list[Fresh], wanted: list[bool]) \
            -> tuple[torch.Tensor, list[int], list[int], list[int], list[int]]:
        """The queries of a ragged forward, row after row: their embeddings [queries, hidden] (a row's head of
        virtual tokens, then its tokens), positions, the slots they write, the row each belongs to, and the index
        of each wanted row's last query."""
        ids: list[int] = []
        heads: list[torch.Tensor] = []
        token_at: list[int] = []
        head_at: list[int] = []
        positions: list[int] = []
        writes: list[int] = []
        owner: list[int] = []
        last: list[int] = []
        for i, row in enumerate(rows):
            head = 0 if row.head is None else int(row.head.shape[0])
            fresh, start, at = head + len(row.tokens), row.kv.length, len(positions)
            if row.head is not None:
                heads.append(row.head)
                head_at.extend(range(at, at + head))
            ids.extend(row.tokens)
            token_at.extend(range(at + head, at + fresh))
            positions.extend(range(start, start + fresh))
            writes.extend(row.kv.slots(start, start + fresh))
            owner.extend([i] * fresh)
            if wanted[i]:
                last.append(at + fresh - 1)
        device = self.device
        embeds = self.embed(torch.tensor(ids, device=device)) if ids else None
        if not heads:
            assert embeds is not None, "a row computes at least one position"
            return embeds, positions, writes, owner, last
        x = self.embed.weight.new_empty(len(positions), self.embed.weight.shape[1])
        x[torch.tensor(head_at, device=device)] = torch.cat(heads).to(x.dtype)
        if embeds is not None:
            x[torch.tensor(token_at, device=device)] = embeds
        return x, positions, writes, owner, last

    def padded(self, rows: list[Fresh], score_last: int | None = None) -> torch.Tensor:
        """`run` over rows left-padded to a common number of queries, gathering their keys and values.

        Rows are left-padded to a common number of queries; padding queries write SCRATCH, and the
        attended columns are each row's positions, so no row sees another's padding.
        """
        self.write_prefixes([(r.kv, r.prefix) for r in rows if r.prefix is not None])
        x = inject.build_inputs(self.embed, [r.head for r in rows], [r.tokens for r in rows], padding=inject.LEFT)
        queries = x.embeds.shape[1]
        starts, writes = [], []
        for row, mask in zip(rows, x.attention_mask.tolist()):
            fresh, start = sum(mask), row.kv.length
            starts.append(start)
            writes.append([SCRATCH] * (queries - fresh) + row.kv.slots(start, start + fresh))
            row.kv.length += fresh
        positions = torch.where(x.attention_mask.bool(),
                                x.position_ids + torch.tensor(starts, device=self.device)[:, None], 0)
        lengths = [r.kv.length for r in rows]
        width = max(lengths)
        reads = read_slots(self.table([r.kv for r in rows]), torch.tensor(lengths, device=self.device), width)
        cache = PagedCache(self.pool, torch.tensor(writes, device=self.device), reads, past=min(starts))
        out = kv.forward(self.model, cache, inputs_embeds=x.embeds, position_ids=positions,
                         attention_mask=self.masks.over_positions(positions, width), score_last=score_last,
                         packed=self.packed)
        self._keep_prefixes(rows)
        return out.logits

    def _keep_prefixes(self, rows: list[Fresh]) -> None:
        """Caches the prefix KV the rows that keep one (`Fresh.keep`) just wrote."""
        for row in rows:
            if row.keep is not None:
                self.prefixes.put(row.keep, self.read_prefix(row.kv, row.keep_tokens))

    def write_prefixes(self, rows: list[tuple[RowBlocks, PrefixKV]]) -> None:
        """Copies cached prompt prefixes into the first slots of their rows' blocks (one copy per layer)."""
        if not rows:
            return
        slots: list[int] = []
        for row, prefix in rows:
            row.length = int(prefix[0][0].shape[0])
            slots += row.slots(0, row.length)
        index = torch.tensor(slots, device=self.device)
        for layer, (keys, values) in enumerate(zip(self.pool.keys, self.pool.values)):
            keys.index_copy_(0, index, torch.cat([p[layer][0] for _, p in rows]))
            values.index_copy_(0, index, torch.cat([p[layer][1] for _, p in rows]))

    def read_prefix(self, row: RowBlocks, tokens: int) -> PrefixKV:
        """The keys and values of a row's first `tokens` positions, copied out of the pool."""
        index = torch.tensor(row.slots(0, tokens), device=self.device)
        return [(keys.index_select(0, index), values.index_select(0, index))
                for keys, values in zip(self.pool.keys, self.pool.values)]

    def table(self, rows: list[RowBlocks]) -> torch.Tensor:
        """[rows, blocks] block numbers of the rows (0-padded: columns past a row's length read TRASH anyway)."""
        width = max(len(r.blocks) for r in rows)
        return torch.tensor([r.blocks + [0] * (width - len(r.blocks)) for r in rows], dtype=torch.long,
                            device=self.device)
