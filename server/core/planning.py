"""What the worker runs next between two decode steps: which waiting rows one prefill takes, and when a
row too long for the prefill budget is prefilled alone, in chunks.

Every prefill or scoring forward pads its rows to the widest, so its cost is rows x the widest row's
fresh positions; the budget (`--max-prefill-tokens`) bounds that product. Which of the planned rows
get their KV blocks is the KV manager's answer, not the plan's. Between two decode steps
the worker runs at most one budget's worth of prefill (a batch of rows that fit, or one chunk of a
longer row) and one of scoring, so a long prompt delays the running streams by one chunk per token,
never by its whole prefill.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass


def rows_that_fit(fresh: Iterable[int], *, max_rows: int, max_positions: int) -> int:
    """How many of the leading rows one prefill takes, given each row's fresh positions.

    A forward pads every row to its widest, so it computes rows x the widest row's fresh positions,
    not their sum: that product stays within `max_positions` (a first row goes regardless, alone if
    it must), so one long row with many short ones no longer costs many times the budget; the rows
    after it wait for the next prefill.
    """
    taken = widest = 0
    for n in fresh:
        wider = max(widest, n)
        if taken >= max_rows or (taken and (taken + 1) * wider > max_positions):
            break
        taken, widest = taken + 1, wider
    return taken


@dataclass(frozen=True)
class PrefillPlan:
    """The next prefill: at most `rows` leading waiting rows in one forward, or (`chunked`) the first one
    alone in parts. Each row still has to get its KV blocks (the scheduler asks the KV manager)."""

    rows: int
    chunked: bool = False


def plan_prefill(fresh: Iterable[int], *, room: int, max_positions: int) -> PrefillPlan:
    """The prefill to run next, given the waiting rows' fresh positions (in arrival order) and the rows
    the batch has room for.

    A first row over the budget is prefilled in chunks of at most `max_positions`; otherwise the
    leading rows that fit go in one forward.
    """
    rows = iter(fresh)
    first = next(rows, None)
    if room < 1 or first is None:
        return PrefillPlan(0)
    if first > max_positions:
        return PrefillPlan(1, chunked=True)
    return PrefillPlan(rows_that_fit(itertools.chain([first], rows), max_rows=room, max_positions=max_positions))
