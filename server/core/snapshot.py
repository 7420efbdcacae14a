"""What the scheduler reports about itself: counters and a consistent view of its queues and rows.

Torch-free, like `types`: tests, logs, ModelInfo and metrics read these without reaching into the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

from softprompt.server.core.types import KvUsage, TaskLoad


@dataclass
class SchedulerStats:
    """Counters for logs and benchmarks."""

    steps: int = 0
    prefills: int = 0
    max_batch: int = 0
    side_units: int = 0
    preemptions: int = 0  # rows whose KV was dropped to be recomputed later
    prefill_chunks: int = 0  # forwards of rows prefilled in parts, being longer than the budget
    kv_waits: int = 0  # steps in which the next waiting row (generation or Classify) found no KV blocks
    share_preemptions: int = 0  # rows preempted for a more urgent request, or for a task under its fair share
    resumed_parked: int = 0  # of those, rows that rejoined with their KV kept (one query, no recompute)


@dataclass(frozen=True)
class RowSnapshot:
    """A running generation as the scheduler sees it."""

    request_id: int
    generated: int  # tokens produced so far
    kv_blocks: int  # KV blocks it holds


@dataclass(frozen=True)
class SchedulerSnapshot:
    """What the scheduler holds at one moment: for tests, logs and operators (no internals leak)."""

    waiting: tuple[int, ...]  # request ids queued to join the batch, in the order they will (as things stand)
    running: tuple[RowSnapshot, ...]  # rows decoding, or prefilled in chunks
    chunking: int | None  # the request being prefilled in chunks
    scoring_queued: int  # Classify requests waiting for the next group
    scoring_rows: int  # label rows of the Classify group being scored
    side_jobs: int  # training units waiting for the worker
    row_cap: int | None  # the batch size admission stops at after an out-of-memory step
    kv: KvUsage
    stats: SchedulerStats
    tasks: tuple[TaskLoad, ...] = ()  # each busy task's rows, queue and share

    @property
    def idle(self) -> bool:
        """Nothing queued, running or being scored."""
        return not (self.waiting or self.running or self.scoring_queued or self.scoring_rows)
