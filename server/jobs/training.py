"""Server-side training jobs: one at a time, on the serving model, interleaved with generation.

A job's every unit of model work runs on the scheduler's worker (`Scheduler.call`), which owns
the model and gives training a bounded share of its time while requests are being served. Jobs
live in memory: a restart forgets finished jobs (their registered versions stay in the store)
and cancels running ones, which register nothing.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from softprompt.prompts import pipeline
from softprompt.prompts.data import parse_jsonl
from softprompt.prompts.outcomes import TrainingState
from softprompt.prompts.registry import PromptVersion, Registry
from softprompt.prompts.results import Progress
from softprompt.prompts.train import PromptTrainer, TrainingCancelled
from softprompt.server.core.errors import OverloadedError, ShuttingDownError, TrainingJobNotFoundError
from softprompt.server.core.model import BaseModel
from softprompt.server.core.scheduler import Scheduler
from softprompt.server.jobs.types import JobSnapshot, TrainJobRequest

log = logging.getLogger(__name__)

_KEEP_FINISHED = 100  # finished jobs remembered for Get/List


@dataclass
class _Job:
    snapshot: JobSnapshot
    plan: pipeline.TrainingPlan | None  # dropped once the job ends: finished jobs keep no data
    cancel: threading.Event = field(default_factory=threading.Event)


class TrainingJobs:
    """Accepts, runs, reports and cancels training jobs."""

    def __init__(self, base: BaseModel, registry: Registry, scheduler: Scheduler, *, max_jobs: int,
                 max_virtual_tokens: int, unit_rows: int = 0,
                 on_registered: Callable[[PromptVersion], None] | None = None) -> None:
        self.base = base
        self.registry = registry
        self.scheduler = scheduler
        self.max_jobs = max_jobs
        self.max_virtual_tokens = max_virtual_tokens
        self.unit_rows = unit_rows
        # Called with each version a job registers, before the job reports success (the server warms it
        # there, as it does an upload); it must not raise.
        self.on_registered = on_registered
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._queue: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._revisions = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="softprompt-training", daemon=True)

    def start(self) -> None:
        """Starts the thread that runs queued jobs."""
        self._thread.start()

    # ------------------------------------------------------------------ API

    def submit(self, request: TrainJobRequest) -> JobSnapshot:
        """Checks the request (no model compute) and queues it; raises what the caller must fix."""
        train = parse_jsonl(request.train_jsonl, source="train_jsonl")
        held_out = parse_jsonl(request.eval_jsonl, source="eval_jsonl") if request.eval_jsonl.strip() else None
        plan = pipeline.plan(
            self.registry, self.base.spec, request.task, train, held_out, request.options,
            description=request.description, tags=request.tags, promote_alias=request.promote_alias,
            max_virtual_tokens=self.max_virtual_tokens,
        )
        # Tokenizing is cheap and finds over-long targets before the job queues.
        checker = PromptTrainer(self.base.model, self.base.tokenizer, request.options,
                                kv_layout=self.base.spec.kv_layout)
        checker.encode(plan.train)
        checker.encode(plan.held_out, what="held-out")
        with self._cond:
            if self._closed:
                raise ShuttingDownError("the server is shutting down and takes no new training jobs")
            active = sum(1 for j in self._jobs.values() if not j.snapshot.done)
            if active >= self.max_jobs:
                raise OverloadedError(f"{active} training jobs are queued or running (the limit): retry later")
            job_id = uuid.uuid4().hex[:16]
            snapshot = JobSnapshot(job_id=job_id, task=plan.task, state=TrainingState.QUEUED, phase="queued",
                                   created_at=_now(), train_examples=len(plan.train),
                                   eval_examples=len(plan.held_out), revision=next(self._revisions))
            self._jobs[job_id] = _Job(snapshot, plan)
            self._queue.append(job_id)
            self._forget_old()
            self._cond.notify_all()
        log.info("training job %s queued for %s: %d training, %d held-out examples, %s", job_id, plan.task,
                 len(plan.train), len(plan.held_out), request.options)
        return snapshot

    def get(self, job_id: str) -> JobSnapshot:
        """The job's current snapshot."""
        with self._cond:
            return self._job(job_id).snapshot

    def list(self) -> list[JobSnapshot]:
        """All remembered jobs, newest first."""
        with self._cond:
            return [j.snapshot for j in reversed(self._jobs.values())]

    def cancel(self, job_id: str) -> JobSnapshot:
        """Cancels a queued or running job (a running one stops at its next unit of work)."""
        with self._cond:
            job = self._job(job_id)
            if job.snapshot.state == TrainingState.QUEUED:
                self._queue.remove(job_id)
                self._update(job, state=TrainingState.CANCELLED, phase="cancelled", finished_at=_now())
            elif job.snapshot.state == TrainingState.RUNNING:
                job.cancel.set()
                self._update(job, phase="cancelling")
            return job.snapshot

    def watch(self, job_id: str, is_active: Callable[[], bool] = lambda: True) -> Iterator[JobSnapshot]:
        """Yields the job now and after each change, until it ends or `is_active()` turns false."""
        seen = -1
        while is_active():
            with self._cond:
                job = self._job(job_id)
                if job.snapshot.revision == seen:
                    self._cond.wait(timeout=1.0)
                    continue
                snapshot = job.snapshot
            seen = snapshot.revision
            yield snapshot
            if snapshot.done:
                return

    def close(self, timeout_s: float = 10.0) -> None:
        """Cancels every job and waits for the running one to stop; nothing half-trained is registered."""
        with self._cond:
            self._closed = True
            for job_id in list(self._queue):
                self._update(self._jobs[job_id], state=TrainingState.CANCELLED, phase="cancelled", finished_at=_now(),
                             error="the server shut down before the job started")
            self._queue.clear()
            for job in self._jobs.values():
                job.cancel.set()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._queue:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._jobs[self._queue.pop(0)]
                self._update(job, state=TrainingState.RUNNING, phase="starting")
            self._execute(job)

    def _execute(self, job: _Job) -> None:
        started = time.monotonic()
        plan = job.plan
        assert plan is not None, "a queued job keeps its plan until it ends"

        def progress(p: Progress) -> None:
            with self._cond:
                self._update(job, phase=p.phase, progress=p)

        def phase(name: str) -> None:
            with self._cond:
                self._update(job, phase=name)

        trainer = PromptTrainer(self.base.model, self.base.tokenizer, plan.options, runner=self.scheduler.call,
                                on_progress=progress, cancel=job.cancel, max_unit_rows=self.unit_rows,
                                kv_layout=self.base.spec.kv_layout)
        try:
            outcome = pipeline.execute(plan, trainer, self.registry, self.base.spec, on_phase=phase)
        except (TrainingCancelled, ShuttingDownError) as e:
            with self._cond:
                self._update(job, state=TrainingState.CANCELLED, phase="cancelled", finished_at=_now(),
                             error="" if isinstance(e, TrainingCancelled) else str(e))
            log.info("training job %s cancelled", job.snapshot.job_id)
            return
        except Exception as e:  # noqa: BLE001 - a failed job is reported, the server keeps serving
            log.exception("training job %s failed", job.snapshot.job_id)
            with self._cond:
                self._update(job, state=TrainingState.FAILED, phase="failed", finished_at=_now(),
                             error=f"{type(e).__name__}: {e}")
            return
        result, promotion = outcome.result, outcome.promotion
        if self.on_registered is not None:
            self.on_registered(outcome.version)
        with self._cond:
            self._update(job, state=TrainingState.SUCCEEDED, phase="done", finished_at=_now(), before=result.before,
                         after=result.after, version=outcome.version,
                         promoted=bool(promotion and promotion.promoted),
                         promotion="" if promotion is None else promotion.message)
        log.info("training job %s registered %s after %d steps in %.1f s%s", job.snapshot.job_id,
                 outcome.version.ref, result.steps, time.monotonic() - started,
                 "" if promotion is None else f"; {promotion.message}")

    # ------------------------------------------------------------------ helpers (hold self._cond)

    def _job(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise TrainingJobNotFoundError(
                f"no training job {job_id!r} on this server (jobs are kept in memory until the server restarts): "
                "list them with ListTrainingJobs"
            )
        return job

    def _update(self, job: _Job, **changes: object) -> None:
        job.snapshot = replace(job.snapshot, revision=next(self._revisions), **changes)  # type: ignore[arg-type]
        if job.snapshot.done:
            job.plan = None
        self._cond.notify_all()

    def _forget_old(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.snapshot.done]
        for job_id in finished[:max(0, len(finished) - _KEEP_FINISHED)]:
            del self._jobs[job_id]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
