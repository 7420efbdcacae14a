"""What the worker runs next between two decode steps: which waiting rows one prefill takes, and when a
row too long for the prefill budget is prefilled alone, in chunks.

Every prefill or scoring forward pads its rows to the widest, so its cost is rows x the widest row's
fresh positions; the budget (`--max-prefill-tokens`) bounds that product. A prefilled row also takes
KV blocks, so a prefill takes only rows whose blocks are free. Between two decode steps
the worker runs at most one budget's worth of prefill (a batch of rows that fit, or one chunk of a
longer row) and one of scoring, so a long prompt delays the running streams by one chunk per token,
never by its whole prefill.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def rows_that_fit(fresh: Iterable[int], *, max_rows: int, max_positions: int,
                  blocks: Sequence[int] | None = None, free_blocks: int = 0) -> int:
    """How many of the leading rows one prefill takes, given each row's fresh positions.

    A forward pads every row to its widest, so it computes rows x the widest row's fresh positions,
    not their sum: that product stays within `max_positions` (a first row goes regardless, alone if
    it must), so one long row with many short ones no longer costs many times the budget; the rows
    after it wait for the next prefill. With `blocks` (each row's KV blocks) the rows taken also hold
    at most `free_blocks`, the first row included: a row the pool cannot hold now waits.
    """
    taken = widest = held = 0
    for n in fresh:
        wider = max(widest, n)
        if taken >= max_rows or (taken and (taken + 1) * wider > max_positions):
            break
        if blocks is not None:
            held += blocks[taken]
            if held > free_blocks:
                break
        taken, widest = taken + 1, wider
    return taken


@dataclass(frozen=True)
class PrefillPlan:
    """The next prefill: `rows` leading waiting rows in one forward, or (`chunked`) the first one alone in parts."""

    rows: int
    chunked: bool = False


def plan_prefill(fresh: list[int], blocks: list[int], *, room: int, max_positions: int,
                 free_blocks: int) -> PrefillPlan:
    """The prefill to run next, given the waiting rows' fresh positions and KV blocks, the rows the batch
    has room for and the KV blocks free.

    A first row over the budget is prefilled in chunks of at most `max_positions`; otherwise the
    leading rows that fit go in one forward. Rows go in arrival order: one the pool cannot hold yet
    holds back those behind it, so a long request is not starved by short ones.
    """
    if room < 1 or not fresh or blocks[0] > free_blocks:
        return PrefillPlan(0)
    if fresh[0] > max_positions:
        return PrefillPlan(1, chunked=True)
    return PrefillPlan(rows_that_fit(fresh, max_rows=room, max_positions=max_positions, blocks=blocks,
                                     free_blocks=free_blocks))
