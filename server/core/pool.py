"""The KV pool: every row's keys and values in fixed-size blocks of one preallocated buffer per layer.

Sized once at startup (`--kv-cache-memory`), the pool never grows, never shrinks and never moves
what it holds. A row holds whole blocks of `BLOCK_SIZE` token slots, as many as its tokens fill, and
names them in its own block list (the block table); a row joining or leaving allocates or frees only
its own blocks, and a row's memory grows with what it holds, not with the batch's longest row.
This is vLLM's paged KV design; the attention reads a row's tokens through its block table.

Layout per layer: keys and values `[(blocks + 1) * BLOCK_SIZE, kv_heads, head_dim]`, token-slot
major, so one `index_select` over slot numbers gathers any rows' tokens in order, copying each
token's heads as one contiguous piece (twice as fast on a CPU as gathering per head), and one
`index_copy_` writes a step's new tokens wherever their rows' blocks are. Block 0 is reserved:
slot `TRASH` stays zero and is what padding columns read (a masked column gets weight 0, and 0 * a
finite value is 0, never NaN), slot `SCRATCH` is where padding rows and padding queries write.

Blocks are handed out from a free list plus a high-water mark, so a pool of millions of blocks
(tiny test models on a large budget) costs nothing until used; on CPU the buffers are allocated
uninitialized, and the operating system backs only the pages rows have written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softprompt.server.core.types import KvUsage

BLOCK_SIZE = 16  # token slots per block: vLLM's default, small enough that a row wastes < 16 slots
TRASH = 0  # the slot padding columns read: zeros, forever
SCRATCH = 1  # the slot padding rows and padding queries write to; never read through an unmasked column


class KvPoolFullError(RuntimeError):
    """Not enough free blocks for an allocation; the scheduler preempts rows or waits, it never fails a request for it."""


@dataclass(frozen=True)
class LayerShape:
    """One attention layer's cached keys and values per token."""

    kv_heads: int
    head_dim: int


def blocks_for(tokens: int) -> int:
    """Blocks that hold `tokens` tokens."""
    return -(-tokens // BLOCK_SIZE)


class KvPool:
    """Per-layer key and value buffers in blocks, and the free list over them."""

    def __init__(self, layers: list[LayerShape], num_blocks: int, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block of {BLOCK_SIZE} tokens, got {num_blocks}")
        slots = (num_blocks + 1) * BLOCK_SIZE
        self.layers = list(layers)
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = device
        self.keys = [self._buffer(s, slots) for s in layers]
        self.values = [self._buffer(s, slots) for s in layers]
        self._recycled: list[int] = []  # freed blocks, reused first (their pages are already backed)
        self._next = 1  # blocks from here to num_blocks have never been handed out
        self._used = 0
        self._bytes_per_token = self.bytes_per_token(self.layers, dtype)  # read at every step's admission

    def _buffer(self, shape: LayerShape, slots: int) -> torch.Tensor:
        buffer = torch.empty(slots, shape.kv_heads, shape.head_dim, dtype=self.dtype, device=self.device)
        buffer[:BLOCK_SIZE] = 0  # block 0: TRASH must read as zeros
        return buffer

    @staticmethod
    def bytes_per_token(layers: list[LayerShape], dtype: torch.dtype) -> int:
        """Keys and values of one token over all layers, in bytes."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(2 * s.kv_heads * s.head_dim * size for s in layers)

    @classmethod
    def sized(cls, layers: list[LayerShape], budget_bytes: int, *, dtype: torch.dtype,
              device: torch.device) -> KvPool:
        """The pool with as many blocks as `budget_bytes` holds (the reserved block included)."""
        per_block = cls.bytes_per_token(layers, dtype) * BLOCK_SIZE
        blocks = budget_bytes // per_block - 1
        if blocks < 1:
            raise ValueError(f"a KV cache of {budget_bytes} bytes holds no block: one block of {BLOCK_SIZE} tokens "
                             f"takes {per_block} bytes for this model (two with the reserved one); raise "
                             "--kv-cache-memory")
        return cls(layers, blocks, dtype=dtype, device=device)

    # ------------------------------------------------------------------ blocks

    @property
    def free_blocks(self) -> int:
        """Blocks no row holds."""
        return self.num_blocks - self._used

    def allocate(self, n: int) -> list[int]:
        """`n` free blocks; raises KvPoolFullError (allocating nothing) when fewer are free."""
        if n > self.free_blocks:
            raise KvPoolFullError(f"{n} KV blocks wanted, {self.free_blocks} free of {self.num_blocks}")
        take = min(n, len(self._recycled))
        blocks = self._recycled[len(self._recycled) - take:]
        del self._recycled[len(self._recycled) - take:]
        fresh = n - take
        blocks.extend(range(self._next, self._next + fresh))
        self._next += fresh
        self._used += n
        return blocks

    def release(self, blocks: list[int]) -> None:
        """Returns blocks to the free list."""
        self._recycled.extend(blocks)
        self._used -= len(blocks)

    def usage(self, rows: int) -> KvUsage:
        """Size and occupancy now, with the number of rows holding blocks (which the KV manager counts)."""
        return KvUsage(BLOCK_SIZE, self.num_blocks, self._used, rows, self._bytes_per_token)
