"""What a model's attention layers see during one forward over rows whose keys and values live in the KV pool.

A forward hands the model a `PagedCache` and the new positions. At each layer the model calls
`update` with the new positions' keys and values; they are written into the rows' blocks (one
`index_copy_`), and the layer gets back each row's whole history gathered in position order
(one `index_select`): `[rows, kv_heads, width, head_dim]`, column j of a row being its position j,
padding columns reading the zero `TRASH` slot. The gather is a transient per layer -- the pool
itself never moves -- and is the one place a paged attention kernel that reads block tables
directly (FlashAttention's `block_table`, FlashInfer) would slot in on a GPU.

Duck-typed rather than a transformers `Cache` subclass: its internals change between releases,
and a forward given position ids and prebuilt 4D masks needs nothing but `update`.

Where the CPU kernel of `paged_attention` is built, a forward instead attends over the blocks in place
(`InPlace`, `attend`): no gathered copy at all. A decode step is rows of one query each; a ragged
forward (`InPlace.ragged`: prefills, chunks and decode rows together, the engine's mixed steps) is one
row of all the forward's queries, each query its own row of the kernel, attending to its row's
positions up to its own.

The slot arithmetic (`read_slots`, `write_slots`) is tensor work only, so a CUDA graph captured
over a decode step recomputes it from the step's block table and positions at every replay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from softprompt.server.core.pool import BLOCK_SIZE, SCRATCH, TRASH, KvPool


def read_slots(table: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, width] slot of each row's position j < its length, TRASH past it.

    `table` [rows, blocks] holds each row's block numbers (at least `ceil(width / BLOCK_SIZE)` columns).
    """
    columns = torch.arange(width, device=table.device)
    slots = table[:, columns // BLOCK_SIZE] * BLOCK_SIZE + columns % BLOCK_SIZE
    return torch.where(columns[None, :] < lengths[:, None], slots, TRASH)


def write_slots(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The slot of each (row, position) in `positions` [rows, queries]; a negative position (padding) writes SCRATCH."""
    real = positions >= 0
    at = positions.clamp(min=0)
    slots = table.gather(1, at // BLOCK_SIZE) * BLOCK_SIZE + at % BLOCK_SIZE
    return torch.where(real, slots, SCRATCH)


class Segment:
    """Queries `start` to `stop - 1` of a ragged forward, one row's consecutive positions, attended by SDPA over that
    row's keys and values gathered once per layer (`slots`: its positions 0 to the last query's), where the kernel,
    which reads a row's keys again for every query, would cost more: a long chunk over a long history."""

    def __init__(self, start: int, stop: int, slots: torch.Tensor, positions: torch.Tensor) -> None:
        self.start, self.stop = start, stop
        self.slots = slots  # [width] the row's slots of positions 0 .. width - 1
        self.positions = positions  # [stop - start] the queries' positions
        self._masks: dict[int, torch.Tensor] = {}

    def mask(self, window: int) -> torch.Tensor:
        """[1, 1, queries, width] which columns each query sees (causal; within `window` tokens when it is not 0)."""
        if window not in self._masks:
            columns = torch.arange(self.slots.shape[0], device=self.slots.device)
            query = self.positions[:, None]
            allowed = columns <= query
            if window:
                allowed &= columns > query - window
            self._masks[window] = allowed[None, None]
        return self._masks[window]


# A ragged forward's row of more queries x attended positions than this is attended by SDPA over its gathered keys
# (a `Segment`), not by the kernel: the kernel reads a row's keys once per query, which costs little for decode
# rows and short prefills and much for a long chunk over a long history (a 256-query chunk over 2,000 positions).
SEGMENT_WORK = 128 * 128


@dataclass(frozen=True)
class InPlace:
    """What the kernel needs to attend over the rows' blocks where they lie (`paged_attention`)."""

    kernel: ModuleType  # the built extension: paged_decode(q, keys, values, table, lengths, block, window, scale)
    table: torch.Tensor  # [rows, blocks] int64 block numbers
    lengths: torch.Tensor  # [rows] int64 positions each row attends, the new one included (0: a padding row or a
    # query a segment answers)
    windows: Callable[[int], int]  # a layer's sliding window in tokens, 0 for full attention
    ragged: bool = False  # one row of every query (table and lengths per query): nothing else can attend it
    segments: tuple[Segment, ...] = ()  # a ragged forward's long rows, attended by SDPA instead


class PagedCache:
    """The cache object of one forward: writes new keys and values to their slots, returns the rows' history.

    With `in_place` (decode steps, where the kernel is built) `update` only writes: the attention layers'
    SDPA calls are answered by `attend`, which reads the blocks in place (`paged_attention.fused`).
    """

    def __init__(self, pool: KvPool, writes: torch.Tensor, reads: torch.Tensor | None, past: int = 0,
                 in_place: InPlace | None = None) -> None:
        if reads is None and (in_place is None or not in_place.ragged):
            raise ValueError("only a ragged in-place forward has no columns to gather")
        self._pool = pool
        self._writes = writes.reshape(-1)  # [rows * queries] slots of the new positions, row-major
        # [rows * width] slots of every attended column, row-major (None: a ragged forward gathers nothing)
        self._reads = None if reads is None else reads.reshape(-1)
        self._rows, self._width = (0, 0) if reads is None else reads.shape
        self._past = past
        self.in_place = in_place

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes [rows, kv_heads, queries, head_dim] keys and values; returns [rows, kv_heads, width, head_dim] of
        each, or (in place) the new ones only, which the kernel does not read."""
        self._write(self._pool.keys[layer_idx], key_states)
        self._write(self._pool.values[layer_idx], value_states)
        if self.in_place is not None:
            return key_states, value_states
        return self.gathered(layer_idx)

    def gathered(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's keys and values of `layer` in position order, [rows, kv_heads, width, head_dim]: a copy."""
        return self._gather(self._pool.keys[layer]), self._gather(self._pool.values[layer])

    def covers(self, query: torch.Tensor) -> bool:
        """Whether the kernel answers this attention call: one kernel row per query ([rows, heads, 1, dim] of a
        decode step, [1, heads, queries, dim] of a ragged forward)."""
        return self.in_place is not None and query.shape[0] * query.shape[2] == self.in_place.lengths.shape[0]

    def attend(self, layer: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """The kernel's attention, each query a kernel row: [batch, heads, queries, head_dim] in, [batch, queries,
        heads, head_dim] out."""
        assert self.in_place is not None
        batch, heads, queries, dim = query.shape
        scale = dim ** -0.5 if scaling is None else scaling
        window = self.in_place.windows(layer)
        keys, values = self._pool.keys[layer], self._pool.values[layer]
        out = self.in_place.kernel.paged_decode(
            query.transpose(1, 2).reshape(batch * queries, heads, dim).to(torch.float32).contiguous(),
            keys, values, self.in_place.table, self.in_place.lengths, BLOCK_SIZE, window, float(scale))
        for seg in self.in_place.segments:
            k = keys.index_select(0, seg.slots).transpose(0, 1)[None]  # [1, kv_heads, width, dim]
            v = values.index_select(0, seg.slots).transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(query[:, :, seg.start:seg.stop].to(k.dtype), k, v,
                                               attn_mask=seg.mask(window), scale=scale, enable_gqa=True)
            out[seg.start:seg.stop] = o[0].transpose(0, 1)
        return out.to(query.dtype).view(batch, queries, heads, dim)

    def _write(self, buffer: torch.Tensor, new: torch.Tensor) -> None:
        heads, dim = buffer.shape[1], buffer.shape[2]
        buffer.index_copy_(0, self._writes, new.transpose(1, 2).reshape(-1, heads, dim).to(buffer.dtype))

    def _gather(self, buffer: torch.Tensor) -> torch.Tensor:
        assert self._reads is not None, "a ragged forward has no padded columns to gather"
        heads, dim = buffer.shape[1], buffer.shape[2]
        return buffer.index_select(0, self._reads).view(self._rows, self._width, heads, dim).transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions before this forward's (some transformers releases ask, though positions are given)."""
        return self._past
