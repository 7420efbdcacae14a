"""A batch's keys and values in preallocated buffers that each decode step writes one column of.

A DynamicCache grows by concatenation, which copies every row's whole history at every step.
Here each layer's keys and values live in one buffer [rows, kv_heads, columns, head_dim]. Rows
are right-aligned at a shared column `t` (the next one to write), so a decode step has the same
shape whatever its rows' lengths: every live row writes column `t` and attends to columns up to
`t` under a boolean mask. With the write position held in a tensor, a CUDA graph captured once
for a (rows, width) shape replays every later step of that shape.

Masked columns get attention weight exactly 0, but 0 * NaN is NaN: a column a row can see past
its mask must hold finite values. Buffers start zeroed, a joining row's columns are zeroed before
its keys are copied in, and everything else in them was computed by the model.
"""

from __future__ import annotations

import torch

COLUMN_ALIGN = 64  # growth granularity; also the width step of CUDA-graph shapes


def round_up(value: int, step: int) -> int:
    """`value` rounded up to a multiple of `step`."""
    return -(-value // step) * step


def power_of_two(value: int) -> int:
    """The smallest power of two at least `value` (rows grow by doubling; graphs are captured per power of two)."""
    return 1 << max(0, value - 1).bit_length()


class KvArena:
    """Keys, values, mask, next tokens and positions of up to `capacity_rows` rows.

    Live rows are `[0, rows)`. Row r's real columns end at `t - 1`; `mask[r]` marks which of
    them are real (padding and a prompt's left-aligned gaps are not).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor,
                 positions: torch.Tensor, tokens: torch.Tensor, rows: int, t: int) -> None:
        self.keys = keys
        self.values = values
        self.mask = mask  # bool [capacity_rows, capacity_columns]
        self.positions = positions  # long [capacity_rows]: each row's next position id
        self.tokens = tokens  # long [capacity_rows]: each row's newest token, the next step's input
        self.rows = rows
        self.t = t
        # The column the next step writes, as a tensor a captured graph reads at replay.
        self.column = torch.tensor([t], dtype=torch.long, device=mask.device)
        # Bumped whenever the buffers are reallocated: graphs captured on old buffers are stale.
        self.generation = 0

    @classmethod
    def wrap(cls, pairs: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
             positions: torch.Tensor) -> KvArena:
        """An arena over a prefill's own cache tensors [rows, kv_heads, columns, head_dim], without copying."""
        rows, t = mask.shape
        return cls([k for k, _ in pairs], [v for _, v in pairs], mask.bool(), positions.clone(),
                   torch.zeros(rows, dtype=torch.long, device=mask.device), rows, t)

    @classmethod
    def empty(cls, like: KvArena, capacity_rows: int, capacity_columns: int) -> KvArena:
        """A zeroed arena shaped like `like`'s layers, with no live rows."""
        cols = round_up(capacity_columns, COLUMN_ALIGN)
        keys = [k.new_zeros(capacity_rows, k.shape[1], cols, k.shape[3]) for k in like.keys]
        values = [v.new_zeros(capacity_rows, v.shape[1], cols, v.shape[3]) for v in like.values]
        device = like.mask.device
        return cls(keys, values, torch.zeros(capacity_rows, cols, dtype=torch.bool, device=device),
                   torch.zeros(capacity_rows, dtype=torch.long, device=device),
                   torch.zeros(capacity_rows, dtype=torch.long, device=device), 0, 0)

    @property
    def capacity_rows(self) -> int:
        """Rows the buffers hold."""
        return self.mask.shape[0]

    @property
    def capacity_columns(self) -> int:
        """Columns the buffers hold."""
        return self.mask.shape[1]

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(self.keys, self.values))

    # ------------------------------------------------------------------ layout changes

    def reserve(self, rows: int, columns: int) -> None:
        """Makes room for `rows` rows and `columns` columns, reallocating (and copying live data) if needed."""
        if rows <= self.capacity_rows and columns <= self.capacity_columns:
            return
        # Grow columns by at least half so a batch that keeps growing reallocates rarely.
        new_rows = max(power_of_two(rows), self.capacity_rows)
        new_cols = round_up(max(columns, self.capacity_columns + self.capacity_columns // 2), COLUMN_ALIGN)
        n, t = self.rows, self.t
        # Every new buffer is allocated and filled before any is swapped in: an allocation that fails
        # (out of memory) leaves the arena as it was, never some layers on new buffers and some on old.
        keys, values = [], []
        for k, v in zip(self.keys, self.values):
            k2 = k.new_zeros(new_rows, k.shape[1], new_cols, k.shape[3])
            v2 = v.new_zeros(new_rows, v.shape[1], new_cols, v.shape[3])
            k2[:n, :, :t] = k[:n, :, :t]
            v2[:n, :, :t] = v[:n, :, :t]
            keys.append(k2)
            values.append(v2)
        mask = self.mask.new_zeros(new_rows, new_cols)
        mask[:n, :t] = self.mask[:n, :t]
        positions, tokens = _grown(self.positions, new_rows, n), _grown(self.tokens, new_rows, n)
        column = self.column.clone()
        self.keys[:], self.values[:] = keys, values
        self.mask, self.positions, self.tokens, self.column = mask, positions, tokens, column
        self.generation += 1

    def absorb(self, other: KvArena, columns_needed: int) -> None:
        """Appends `other`'s live rows, right-aligned with these at the later of the two `t`s.

        `columns_needed` is how many columns past the new `t` the rows may still write.
        """
        m, t_other = other.rows, other.t
        t = max(self.t, t_other)
        self.reserve(self.rows + m, t + columns_needed)
        if t > self.t:
            self._shift(t - self.t)
        start, n = t - t_other, self.rows
        for k, v, ko, vo in zip(self.keys, self.values, other.keys, other.values):
            k[n:n + m, :, :start] = 0
            v[n:n + m, :, :start] = 0
            k[n:n + m, :, start:t] = ko[:m, :, :t_other]
            v[n:n + m, :, start:t] = vo[:m, :, :t_other]
        self.mask[n:n + m] = False
        self.mask[n:n + m, start:t] = other.mask[:m, :t_other]
        self.positions[n:n + m] = other.positions[:m]
        self.tokens[n:n + m] = other.tokens[:m]
        self.rows = n + m

    def keep(self, rows: list[int]) -> None:
        """Keeps the given live rows (moved to the front, in this order) and drops columns no row still uses."""
        t = self.t
        if rows != list(range(len(rows))):
            index = torch.tensor(rows, device=self.mask.device)
            for k, v in zip(self.keys, self.values):
                k[:len(rows), :, :t] = k[index, :, :t]
                v[:len(rows), :, :t] = v[index, :, :t]
            self.mask[:len(rows), :t] = self.mask[index, :t]
            self.positions[:len(rows)] = self.positions[index]
            self.tokens[:len(rows)] = self.tokens[index]
        self.rows = len(rows)
        if rows:
            # Columns dead in every remaining row only widen attention: slide them out.
            first = int(self.mask[:self.rows, :t].any(dim=0).nonzero()[0])
            if first:
                self._shift(-first)

    def clear(self) -> None:
        """Drops every row, keeping the buffers."""
        self.rows = 0
        self.t = 0
        self.column.fill_(0)

    def _shift(self, by: int) -> None:
        """Moves the live rows' columns right (by > 0, zeros enter on the left) or left (by < 0)."""
        n, t = self.rows, self.t
        src, dst = (slice(0, t), slice(by, t + by)) if by > 0 else (slice(-by, t), slice(0, t + by))
        for k, v in zip(self.keys, self.values):
            k[:n, :, dst] = k[:n, :, src].clone()
            v[:n, :, dst] = v[:n, :, src].clone()
        self.mask[:n, dst] = self.mask[:n, src].clone()
        if by > 0:
            for k, v in zip(self.keys, self.values):
                k[:n, :, :by] = 0
                v[:n, :, :by] = 0
            self.mask[:n, :by] = False
        else:
            # Columns past the new `t` are written before any row reads them, and must not read as real.
            self.mask[:, t + by:t] = False
        self.t = t + by
        self.column.fill_(self.t)

    # ------------------------------------------------------------------ decode steps

    def step_cache(self, rows: int, width: int) -> StepCache:
        """The cache object a decode step over the first `rows` rows, attending to `width` columns, hands the model."""
        return StepCache(self, rows, width)

    def undo_step(self) -> None:
        """After a step that failed before `advance`: its column, marked real when the step began, is not."""
        if self.t < self.capacity_columns:
            self.mask[:, self.t] = False

    def advance(self) -> None:
        """After a step: the next one writes the next column, at the next positions."""
        self.t += 1
        self.column += 1
        self.positions[:self.rows] += 1


class StepCache:
    """What a model's attention layers call `update` on during one decode step.

    Duck-typed rather than a transformers `Cache` subclass: its internals change between releases,
    and a decode step needs nothing but `update` (positions and 4D masks are passed in whole).
    """

    def __init__(self, arena: KvArena, rows: int, width: int) -> None:
        self._arena = arena
        self._rows = rows
        self._width = width

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the step's keys and values at the arena's column and returns the columns to attend to."""
        keys = self._arena.keys[layer_idx][:self._rows]
        values = self._arena.values[layer_idx][:self._rows]
        keys.index_copy_(2, self._arena.column, key_states)
        values.index_copy_(2, self._arena.column, value_states)
        return keys[:, :, :self._width], values[:, :, :self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns before this step (some transformers releases ask when positions are given anyway)."""
        return self._arena.t


def _grown(t: torch.Tensor, rows: int, live: int) -> torch.Tensor:
    out = t.new_zeros(rows)
    out[:live] = t[:live]
    return out
