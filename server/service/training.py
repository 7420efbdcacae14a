"""Training jobs as a transport calls them: a thin facade over `TrainingJobs` that checks what jobs store.

Requests (`TrainJobRequest`) and the `JobSnapshot`s that go back are the jobs' own types, which `types`
re-exports for the transports: nothing is copied on the way through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from softprompt.server.jobs.training import TrainingJobs
from softprompt.server.jobs.types import JobSnapshot, TrainJobRequest
from softprompt.server.observability.logs import RequestIdFilter
from softprompt.server.service.metadata import check_description

log = logging.getLogger(__name__)
log.addFilter(RequestIdFilter())


class TrainingService:
    """Submit, inspect, watch, cancel and list server-side training jobs."""

    def __init__(self, jobs: TrainingJobs) -> None:
        self.jobs = jobs

    def submit(self, request: TrainJobRequest) -> JobSnapshot:
        """Checks the request's metadata, data and options (no model compute) and queues the job."""
        check_description(request.description, request.tags)
        return self.jobs.submit(request)

    def get(self, job_id: str) -> JobSnapshot:
        """The job's current snapshot."""
        return self.jobs.get(job_id)

    def watch(self, job_id: str, is_active: Callable[[], bool]) -> Iterator[JobSnapshot]:
        """The job now and after each change, until it ends or `is_active()` turns false."""
        return self.jobs.watch(job_id, is_active)

    def cancel(self, job_id: str) -> JobSnapshot:
        """Cancels a queued job, or asks a running one to stop at its next unit of work."""
        job = self.jobs.cancel(job_id)
        log.info("training job %s: cancel requested (%s)", job.job_id, job.state)
        return job

    def list(self) -> list[JobSnapshot]:
        """All remembered jobs, newest first."""
        return self.jobs.list()
