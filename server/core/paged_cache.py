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

Where the CPU kernel of `paged_attention` is built, a decode step instead attends over the blocks in
place (`InPlace`, `attend`): no gathered copy at all.

The slot arithmetic (`read_slots`, `write_slots`) is tensor work only, so a CUDA graph captured
over a decode step recomputes it from the step's block table and positions at every replay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

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


@dataclass(frozen=True)
class InPlace:
    """What a decode step's kernel needs to attend over the rows' blocks where they lie (`paged_attention`)."""

    kernel: ModuleType  # the built extension: paged_decode(q, keys, values, table, lengths, block, window, scale)
    table: torch.Tensor  # [rows, blocks] int64 block numbers
    lengths: torch.Tensor  # [rows] int64 positions each row attends, the new one included (0: a padding row)
    windows: Callable[[int], int]  # a layer's sliding window in tokens, 0 for full attention


class PagedCache:
    """The cache object of one forward: writes new keys and values to their slots, returns the rows' history.

    With `in_place` (decode steps, where the kernel is built) `update` only writes: the attention layers'
    SDPA calls are answered by `attend`, which reads the blocks in place (`paged_attention.fused`).
    """

    def __init__(self, pool: KvPool, writes: torch.Tensor, reads: torch.Tensor, past: int = 0,
                 in_place: InPlace | None = None) -> None:
        self._pool = pool
        self._writes = writes.reshape(-1)  # [rows * queries] slots of the new positions, row-major
        self._reads = reads.reshape(-1)  # [rows * width] slots of every attended column, row-major
        self._rows, self._width = reads.shape
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

    def attend(self, layer: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """The kernel's attention of one query per row, [rows, heads, 1, head_dim] in, [rows, 1, heads, head_dim] out."""
        assert self.in_place is not None
        rows, heads, _, dim = query.shape
        scale = dim ** -0.5 if scaling is None else scaling
        out = self.in_place.kernel.paged_decode(
            query.reshape(rows, heads, dim).to(torch.float32).contiguous(), self._pool.keys[layer],
            self._pool.values[layer], self.in_place.table, self.in_place.lengths, BLOCK_SIZE,
            self.in_place.windows(layer), float(scale))
        return out.to(query.dtype).view(rows, 1, heads, dim)

    def _write(self, buffer: torch.Tensor, new: torch.Tensor) -> None:
        heads, dim = buffer.shape[1], buffer.shape[2]
        buffer.index_copy_(0, self._writes, new.transpose(1, 2).reshape(-1, heads, dim).to(buffer.dtype))

    def _gather(self, buffer: torch.Tensor) -> torch.Tensor:
        heads, dim = buffer.shape[1], buffer.shape[2]
        return buffer.index_select(0, self._reads).view(self._rows, self._width, heads, dim).transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions before this forward's (some transformers releases ask, though positions are given)."""
        return self._past
