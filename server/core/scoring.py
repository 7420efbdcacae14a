"""Classify requests the worker is scoring: their label rows, one prefill-budget forward at a time.

The worker takes every waiting Classify request once the previous group is done, sorts the group's
label rows shortest first (rows of similar lengths share a forward, so little of it is padding) and
runs one forward of them between two decode steps, so a burst of Classify requests slows the
running streams by one budget's worth of work per token instead of stalling them.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass

from softprompt.server.core.admission import AdmittedScoring
from softprompt.server.core.engine import Engine, fresh_positions
from softprompt.server.core.errors import DeadlineError
from softprompt.server.core.planning import rows_that_fit

log = logging.getLogger(__name__)


@dataclass
class ScoringJob:
    """A queued Classify request and the future of its labels' log-probabilities."""

    admitted: AdmittedScoring
    future: Future[list[float]]


class ScoringGroup:
    """The label rows of the Classify requests being scored, and their scores so far."""

    def __init__(self) -> None:
        self._rows: list[tuple[ScoringJob, int]] = []
        self._results: dict[int, list[float]] = {}
        self._left: dict[int, int] = {}  # rows still to score, per job

    def __bool__(self) -> bool:
        return bool(self._rows)

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
            self._rows += [(job, j) for j in range(labels)]
        self._rows.sort(key=_scored_positions)

    def run_one(self, engine: Engine, *, max_rows: int, max_positions: int) -> None:
        """Scores the next rows that fit one forward; a job is answered when its last row is scored.

        If the forward raises, the jobs with rows in it fail and their other rows are dropped.
        """
        fit = rows_that_fit(map(_scored_positions, self._rows), max_rows=max_rows, max_positions=max_positions)
        chunk, self._rows = self._rows[:fit], self._rows[fit:]
        try:
            values = engine.score(
                [job.admitted.prompt for job, _ in chunk],
                [job.admitted.prompt_key for job, _ in chunk],
                [job.admitted.input_ids for job, _ in chunk],
                [job.admitted.label_ids[j] for job, j in chunk],
            )
        except Exception as exc:  # noqa: BLE001 - fails these Classify requests, not the batch
            failed = {id(job): job for job, _ in chunk}
            log.exception("scoring failed; failing %d Classify requests", len(failed))
            self._rows = [(job, j) for job, j in self._rows if id(job) not in failed]
            for job in failed.values():
                self._finish(job)
                job.future.set_exception(exc)
            return
        for (job, j), value in zip(chunk, values):
            self._results[id(job)][j] = value
            self._left[id(job)] -= 1
            if self._left[id(job)] == 0:
                job.future.set_result(self._finish(job))

    def fail_all(self, error: BaseException) -> None:
        """Fails every job still being scored (the server is shutting down)."""
        jobs = {id(job): job for job, _ in self._rows}
        self._rows = []
        for job in jobs.values():
            self._finish(job)
            job.future.set_exception(error)

    def _finish(self, job: ScoringJob) -> list[float]:
        del self._left[id(job)]
        return self._results.pop(id(job))


def _scored_positions(row: tuple[ScoringJob, int]) -> int:
    job, j = row
    return fresh_positions(job.admitted.prompt, len(job.admitted.input_ids) + len(job.admitted.label_ids[j]))
