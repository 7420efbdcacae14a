"""Classify requests the worker is scoring: their label rows, one prefill-budget forward at a time.

The worker takes every waiting Classify request once the previous group is done, sorts the group's
label rows shortest first (rows of similar lengths share a forward, so little of it is padding) and
runs one forward of them between two decode steps, so a burst of Classify requests slows the
running streams by one budget's worth of work per token instead of stalling them. The rows of a
forward hold KV blocks of the pool while it runs, like any other row: when the pool is full they
wait, and while they hold blocks, generation waits.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

from softprompt.server.core.admission import AdmittedScoring
from softprompt.server.core.engine import Engine, ScoreRow
from softprompt.server.core.errors import DeadlineError
from softprompt.server.core.fairness import Ticket
from softprompt.server.core.planning import rows_that_fit

log = logging.getLogger(__name__)


@dataclass
class ScoringJob:
    """A queued Classify request and the future of its labels' log-probabilities."""

    admitted: AdmittedScoring
    future: Future[list[float]]
    ticket: Ticket | None = None  # fair share's: its scored positions are charged to its task


class ScoringGroup:
    """The label rows of the Classify requests being scored, and their scores so far.

    Each step the worker first `claim`s the next forward's rows (they take their KV blocks from the
    KV manager, as generation rows do, so Classify memory is part of --kv-cache-memory), then runs
    them (`run_one`), which gives the blocks back.
    """

    def __init__(self) -> None:
        self._rows: list[tuple[ScoringJob, int, ScoreRow]] = []
        self._claimed = 0  # the leading rows holding blocks for the next forward
        self._results: dict[int, list[float]] = {}
        self._left: dict[int, int] = {}  # rows still to score, per job

    def __bool__(self) -> bool:
        return bool(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def take(self, jobs: list[ScoringJob]) -> None:
        """Starts the jobs not cancelled or past their deadline; their rows join the group, shortest first."""
        now = time.monotonic()
        for job in jobs:
            deadline = job.admitted.deadline
            if not job.future.set_running_or_notify_cancel():
                continue
            if deadline is not None and now >= deadline:
                job.future.set_exception(DeadlineError("deadline exceeded while queued: raise the deadline"))
                continue
            labels = len(job.admitted.label_ids)
            if not labels:
                job.future.set_result([])
                continue
            self._results[id(job)], self._left[id(job)] = [0.0] * labels, labels
            a = job.admitted
            self._rows += [(job, j, ScoreRow(a.prompt, a.prompt_key, a.input_ids, a.label_ids[j]))
                           for j in range(labels)]
        self._rows.sort(key=lambda row: row[2].kv_tokens)

    def claim(self, engine: Engine, *, max_rows: int, max_positions: int) -> int:
        """Gives the next forward's rows (the leading ones that fit the budget) their KV blocks, stopping at
        the first the KV manager says no to; returns how many hold blocks."""
        fit = rows_that_fit((engine.fresh_positions(r.prompt, r.key, len(r.tokens)) for _, _, r in self._rows),
                            max_rows=max_rows, max_positions=max_positions)
        claimed = 0
        for _, _, row in self._rows[self._claimed:fit]:
            if engine.kv.allocate_slots(row.kv, row.kv_tokens) is None:
                break
            claimed += 1
        self._claimed += claimed
        return self._claimed

    def claimed(self) -> list[tuple[ScoringJob, ScoreRow]]:
        """The rows holding blocks for the next forward, with their jobs."""
        return [(job, row) for job, _, row in self._rows[:self._claimed]]

    def run_one(self, engine: Engine) -> None:
        """Scores the claimed rows in one forward; a job is answered when its last row is scored.

        If the forward raises, the jobs with rows in it fail and their other rows are dropped.
        """
        chunk, self._rows, self._claimed = self._rows[:self._claimed], self._rows[self._claimed:], 0
        if not chunk:
            return
        try:
            values = engine.score([row for _, _, row in chunk])
        except Exception as exc:  # noqa: BLE001 - fails these Classify requests, not the batch
            failed = {id(job): job for job, _, _ in chunk}
            log.exception("scoring failed; failing %d Classify requests", len(failed))
            self._rows = [r for r in self._rows if id(r[0]) not in failed]
            for job in failed.values():
                self._finish(job)
                job.future.set_exception(exc)
            return
        for (job, j, _), value in zip(chunk, values):
            self._results[id(job)][j] = value
            self._left[id(job)] -= 1
            if self._left[id(job)] == 0:
                job.future.set_result(self._finish(job))

    def fail_all(self, engine: Engine, error: BaseException) -> None:
        """Fails every job still being scored (the server is shutting down); claimed blocks go back."""
        jobs = {id(job): job for job, _, _ in self._rows}
        for _, _, row in self._rows[:self._claimed]:
            engine.kv.free(row.kv)
        self._rows, self._claimed = [], 0
        for job in jobs.values():
            self._finish(job)
            job.future.set_exception(error)

    def _finish(self, job: ScoringJob) -> list[float]:
        del self._left[id(job)]
        return self._results.pop(id(job))
