"""The one place that decides who holds which KV blocks: the scheduler asks, and preempts or waits on the answer.

vLLM v1's seam: a row (a generation, a Classify label being scored, a prompt prefix being computed)
asks `allocate_slots(row, tokens)` for blocks to hold its first `tokens` tokens and gets the new
blocks, or None, in which case nothing changed and the caller waits (a row joining) or preempts
(a running row that must grow). Nobody else counts blocks: admission asks whether a request could
ever fit (`capacity_tokens`), the scheduler asks for slots, the engine only reads the block tables.

A row joining (holding no blocks yet) gets its blocks only while a reserve of one block per growing
row already holding blocks stays free: each running row grows by at most one block per decode step,
so admitting new rows never forces the next step to preempt one. A transient row (a Classify label
being scored, a prompt prefix being computed) gives its blocks back before the next decode step, so
it neither needs the reserve kept for it nor keeps one for others.

A row that steps out of the batch while the pool has room (it gave way to a task under its fair share)
is parked (`park`): it keeps its blocks, so it rejoins with one query instead of recomputing what it
generated, but they are the pool's to take back. When someone asks for blocks the free ones cannot
give, parked rows give theirs back first, the longest parked first (their owners then resume by
recompute, as if preempted for memory); only if that cannot make room is the answer None.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from softprompt.server.core.pool import BLOCK_SIZE, KvPool, blocks_for
from softprompt.server.core.types import KvUsage


@dataclass(eq=False)
class RowBlocks:
    """One row's block table and how many of its token slots hold keys and values.

    Token `p` of the row (its position `p`: a row's blocks hold no padding) lives in slot
    `blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE`. Only the KvManager changes `blocks`;
    the engine advances `length` as it writes.
    """

    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens written
    transient: bool = False  # gives its blocks back within the step it took them (it never grows)

    @property
    def room(self) -> int:
        """Tokens the row's blocks hold."""
        return len(self.blocks) * BLOCK_SIZE

    def slots(self, start: int, stop: int) -> list[int]:
        """The slots of the row's tokens `start` to `stop - 1`."""
        return [self.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, stop)]


class KvManager:
    """Hands out and takes back a pool's blocks, row by row, and counts the rows holding any."""

    def __init__(self, pool: KvPool) -> None:
        self.pool = pool
        self._rows = 0  # rows holding blocks
        self._growing = 0  # of those, the ones that are not transient: one block each is kept in reserve
        # By id(row), longest parked first: the blocks taken back first. A row that gives way goes to the front of
        # its task's queue, so within a task the longest parked is the last to rejoin.
        self._parked: dict[int, RowBlocks] = {}

    def allocate_slots(self, row: RowBlocks, tokens: int) -> list[int] | None:
        """Grows `row` to hold `tokens` tokens: the blocks it took (empty if it had room), or None if the
        pool cannot give them now (nothing changes). A growing row holding no blocks is joining: it must
        also leave one block free per growing row already holding blocks. A parked row asking rejoins
        (unparked, unless the answer is None); parked rows give their blocks back first if the free ones
        are short."""
        parked = self._parked.pop(id(row), None)
        need = blocks_for(tokens) - len(row.blocks)
        if need <= 0:
            return []
        joining = not row.blocks
        reserve = self._growing if joining and not row.transient else 0
        if need + reserve > self.pool.free_blocks and not self._evict(need, reserve):
            if parked is not None:
                self._parked[id(row)] = parked
            return None
        taken = self.pool.allocate(need)
        row.blocks += taken
        if joining:
            self._rows += 1
            self._growing += not row.transient
        return taken

    def park(self, row: RowBlocks) -> None:
        """Lets `row`, out of the batch, keep its blocks until it asks again or someone needs them (then
        `free`d: its `length` reads 0)."""
        if row.blocks:
            self._parked[id(row)] = row

    def _evict(self, need: int, reserve: int) -> bool:
        """Frees parked rows, longest parked first, until `need` blocks and the `reserve` a joining row leaves
        (one block less per parked row freed: each was a growing row) are free; frees nothing and says False
        if even all of them would not do."""
        free, chosen = self.pool.free_blocks, []
        for parked in self._parked.values():
            if need + reserve <= free:
                break
            chosen.append(parked)
            free += len(parked.blocks)
            reserve = max(0, reserve - 1)
        if need + reserve > free:
            return False
        for parked in chosen:
            self.free(parked)
        return True

    @property
    def parked_rows(self) -> int:
        """Rows out of the batch still holding their blocks."""
        return len(self._parked)

    def free(self, row: RowBlocks) -> None:
        """Takes back all of a row's blocks (a row finished, preempted, scored or abandoned; idempotent)."""
        self._parked.pop(id(row), None)
        if row.blocks:
            self.pool.release(row.blocks)
            row.blocks = []
            self._rows -= 1
            self._growing -= not row.transient
        row.length = 0

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one row could ever hold: the whole pool."""
        return self.pool.num_blocks * BLOCK_SIZE

    def usage(self) -> KvUsage:
        """The pool's size and occupancy now (a lock-free read, for ModelInfo and metrics)."""
        return self.pool.usage(self._rows)
