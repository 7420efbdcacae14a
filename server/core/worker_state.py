"""What the scheduler's worker holds: queued and running requests, side jobs, and the state between steps."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from softprompt.server.core.admission import Admitted
from softprompt.server.core.engine import Batch, PartialPrefill, Sequence
from softprompt.server.core.fairness import FairQueue, FairShare, Ticket
from softprompt.server.core.handle import Handle
from softprompt.server.core.scoring import ScoringGroup, ScoringJob


@dataclass(eq=False)
class Request:
    """A queued or running generation: the engine's row and the caller's handle."""

    admitted: Admitted
    handle: Handle
    ticket: Ticket  # fair share's view: task, key, priority, and what its limits counted

    @property
    def sequence(self) -> Sequence:
        """The request's engine row."""
        return self.admitted.sequence


@dataclass
class SideJob:
    """A unit of model work a training job hands the worker (`Scheduler.call`)."""

    fn: Callable[[], Any]
    future: Future[Any]


@dataclass
class Work:
    """What the worker takes for its next step."""

    new: list[Request]  # arrivals holding the blocks of their prefill and first step
    side: SideJob | None
    batch: Batch | None  # the running batch, less any row that gave way to the arrivals


@dataclass
class WorkerState:
    """What the worker holds between steps: queues, running rows, the chunked row, its time split."""

    waiting: FairQueue[Request] = field(default_factory=lambda: FairQueue(attrgetter("ticket")))
    running: dict[int, Request] = field(default_factory=dict)
    scoring: deque[ScoringJob] = field(default_factory=deque)
    scored: ScoringGroup = field(default_factory=ScoringGroup)  # the Classify rows being scored
    partial: tuple[Request, PartialPrefill] | None = None  # a row being prefilled in chunks
    side: deque[SideJob] = field(default_factory=deque)
    abandoned: list[Sequence] = field(default_factory=list)  # withdrawn from the queue: blocks the worker frees
    # Worker seconds spent serving and on side jobs since the worker was last idle.
    serve_s: float = 0.0
    side_s: float = 0.0
    last_side_s: float = 0.0  # the latest side job's duration
    # Rows the batch held when a step last had to preempt: admission stops there until the batch empties.
    row_cap: int | None = None

    def busy(self) -> bool:
        """Whether a request is waiting, running or being scored, or a side job is queued."""
        return bool(self.waiting or self.running or self.scoring or self.scored or self.partial or self.side)

    def waiting_in_order(self, fair: FairShare, running: list[Ticket]) -> tuple[int, ...]:
        """The waiting requests' ids in the order they would join: fair order, then the tasks at their running cap."""
        order = list(self.waiting.ordered(fair, running))
        capped = set(order).symmetric_difference(self.waiting)
        return tuple(r.sequence.request_id for r in [*order, *(r for r in self.waiting if r in capped)])
