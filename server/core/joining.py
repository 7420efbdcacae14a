"""The scheduler's way in: which waiting requests join the next step, and which running rows give way to them.

Each step the worker asks `Joining.take` for the requests its next prefill (or mixed step) takes. They go in
fair-share order (`fairness`), each holding the KV blocks of its prefill and first step (the KV manager's one
question, `allocate_slots`). When the first of them finds no free row or no blocks, fair share may name a running
row to give way to it (`FairShare.victim`): that row steps out of the batch parked (`Engine.set_aside`) and goes
back to the front of its queue (the scheduler's `give_way`). Into a full batch, each of the first requests in turn
may make one row give way, so a burst under its share joins in one step rather than one a step.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from softprompt.server.core.engine import Batch, Engine, PartialPrefill, Sequence
from softprompt.server.core.fairness import FairShare
from softprompt.server.core.planning import plan_prefill
from softprompt.server.core.snapshot import SchedulerStats
from softprompt.server.core.worker_state import Request, WorkerState


class Joining:
    """Takes, on the worker, the waiting requests the next step prefills, making room for them (see above)."""

    def __init__(self, engine: Engine, fair: FairShare, state: WorkerState, stats: SchedulerStats,
                 give_way: Callable[[list[Sequence]], None]) -> None:
        self.engine = engine
        self.fair = fair
        self._state = state
        self.stats = stats
        self._give_way = give_way  # puts rows that gave way back at the front of their queue, parked

    def take(self, batch: Batch | None, rows: int, max_positions: int) -> tuple[list[Request], Batch | None]:
        """The waiting rows the next prefill takes, each holding its KV blocks (a row over the budget instead
        starts its chunked prefill), and the batch, less any rows that gave way to them (into a full batch, each
        of the first rows in turn may make one give way).

        Rows go in fair-share order: the first that the KV manager has no blocks for holds back those
        behind it, so a long request is not starved by short ones. `max_positions` is the prefill's budget.
        """
        state, engine = self._state, self.engine
        room = rows - (0 if batch is None else len(batch))
        order = state.waiting.ordered(self.fair, [r.ticket for r in list(state.running.values())])
        # A plan looks one row past the room; a full batch, at as many as may each make way.
        candidates = list(itertools.islice(order, room + 1 if room > 0 else rows))
        if not candidates:  # every waiting task is at its max_running cap
            return [], batch
        batch, joined = self._make_way(batch, rows, candidates[0])
        if not joined:
            return [], batch
        made = 1
        if room <= 0:  # the next ones may make way too, so a burst under its share joins in one step, not one a step
            while made < len(candidates):
                batch, joined = self._make_way(batch, rows - made, candidates[made])
                if not joined:
                    break
                made += 1
        fresh = [engine.joining_positions(r.sequence) for r in candidates]
        plan = plan_prefill(fresh, room=rows - (0 if batch is None else len(batch)),
                            max_positions=max_positions)
        for request in candidates[plan.rows:made]:  # made way, but past the prefill's budget: a later step's
            engine.kv.park(request.sequence.kv)
        taken = candidates[:1]
        for request in candidates[1:plan.rows]:
            if engine.kv.allocate_slots(request.sequence.kv, request.sequence.kv_tokens) is None:
                self.stats.kv_waits += 1
                break
            taken.append(request)
        now = time.monotonic()
        for request in taken:
            state.waiting.remove(request)
            self.fair.start(request.ticket)
            request.handle.mark_started(now)
        # Counted again: a parked row further back may have given its blocks to one in front of it.
        fresh = [engine.joining_positions(r.sequence) for r in taken]
        self.stats.resumed_parked += sum(r.sequence.resumes_in_place for r in taken)
        self.fair.charge((r.ticket, positions, 0) for r, positions in zip(taken, fresh))
        if not plan.chunked:
            return taken, batch
        request = taken[0]
        state.running[request.sequence.request_id] = request
        state.partial = request, PartialPrefill(request.sequence)
        return [], batch

    def _make_way(self, batch: Batch | None, rows: int, head: Request) -> tuple[Batch | None, bool]:
        """Gets `head`, the first waiting row in fair order, a free row and its KV blocks; while it has not,
        the running row that fair share says should give way to it (`FairShare.victim`) is preempted, newest
        rows first. Returns the batch left and whether `head` holds its blocks."""
        kv = self.engine.kv
        while True:
            room = rows - (0 if batch is None else len(batch))
            if room >= 1 and kv.allocate_slots(head.sequence.kv, head.sequence.kv_tokens) is not None:
                return batch, True
            index = None if batch is None else self.fair.victim(
                head.ticket, [self._state.running[s.request_id].ticket for s in batch.sequences], rows,
                self._state.waiting.keys(head.ticket.priority),
                frees_in=min(s.params.max_new_tokens - len(s.generated) for s in batch.sequences))
            if batch is None or index is None:
                if room >= 1:
                    self.stats.kv_waits += 1  # a free row, but no blocks
                return batch, False
            victim = batch.sequences[index]
            batch = self.engine.set_aside(batch, index)  # parked: it rejoins with one query while the pool has room
            self._give_way([victim])
