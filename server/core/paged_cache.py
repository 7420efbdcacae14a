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

The slot arithmetic (`read_slots`, `write_slots`) is tensor work only, so a CUDA graph captured
over a decode step recomputes it from the step's block table and positions at every replay.
"""

from __future__ import annotations

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


class PagedCache:
    """The cache object of one forward: writes new keys and values to their slots, returns the rows' history."""

    def __init__(self, pool: KvPool, writes: torch.Tensor, reads: torch.Tensor, past: int = 0) -> None:
        self._pool = pool
        self._writes = writes.reshape(-1)  # [rows * queries] slots of the new positions, row-major
        self._reads = reads.reshape(-1)  # [rows * width] slots of every attended column, row-major
        self._rows, self._width = reads.shape
        self._past = past

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes [rows, kv_heads, queries, head_dim] keys and values; returns [rows, kv_heads, width, head_dim] of each."""
        return (self._write_and_gather(self._pool.keys[layer_idx], key_states),
                self._write_and_gather(self._pool.values[layer_idx], value_states))

    def _write_and_gather(self, buffer: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        heads, dim = buffer.shape[1], buffer.shape[2]
        buffer.index_copy_(0, self._writes, new.transpose(1, 2).reshape(-1, heads, dim).to(buffer.dtype))
        gathered = buffer.index_select(0, self._reads).view(self._rows, self._width, heads, dim)
        return gathered.transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions before this forward's (some transformers releases ask, though positions are given)."""
        return self._past
