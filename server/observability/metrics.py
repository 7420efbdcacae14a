"""What the server records about its requests and state, without depending on a metrics library.

The servicers and the interceptor talk to a `Metrics`; with --metrics-port unset that is
`NoMetrics`, which does nothing. prometheus_client is optional (the GPU image has none), so only
`factory.create_metrics` imports `softprompt.server.observability.prometheus`, and only when metrics are asked for.
Gauges such as queue depth and cache counts are not pushed by the worker loop: a `Snapshot` of
them is pulled from the serving parts when the endpoint is scraped.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from softprompt.prompts.outcomes import TrainingState
from softprompt.prompts.refs import task_name

# Only for annotations: both transports import this module, and the serving parts it reads need torch.
if TYPE_CHECKING:
    from softprompt.server.core.prompt_cache import DeviceLru, HostTier
    from softprompt.server.core.scheduler import Scheduler
    from softprompt.server.core.types import CacheStats, KvUsage, TaskLoad
    from softprompt.server.jobs.training import TrainingJobs

# The first MAX_TASK_LABELS distinct tasks served get their own `task` label value; any later one
# counts under OTHER_TASK, so a registry of thousands of tasks cannot create thousands of series.
MAX_TASK_LABELS = 32
# Registry names start with a letter or digit, so these two never collide with a real task.
BASE_TASK = "_base"  # requests for the bare model (empty task)
OTHER_TASK = "_other"


@dataclass(frozen=True)
class Snapshot:
    """Server state read at scrape time."""

    queue_depth: int
    batch_size: int
    decode_steps: int
    prefills: int
    training_units: int
    kv_cache: KvUsage  # the KV pool's size and occupancy
    preemptions: int = 0  # running requests whose KV was dropped to be recomputed (out of memory)
    share_preemptions: int = 0  # running requests that gave way to a more urgent one or a task under its share
    resumed_parked: int = 0  # of those, requests that rejoined with their KV kept instead of recomputing it
    tasks: tuple[TaskLoad, ...] = ()  # every task served since start: rows, queue, share, tokens (fair share)
    caches: dict[str, CacheStats] = field(default_factory=dict)  # tiers of prompt memory: host, prompt, prefix
    training_jobs: dict[TrainingState, int] = field(default_factory=dict)


class Metrics(Protocol):
    """The recorder the servicers and the interceptor feed."""

    def rpc_done(self, method: str, code: str, seconds: float, transport: str = "grpc") -> None:
        """One request ended: gRPC's full method (`/package.Service/Method`) and status code name, or HTTP's
        route (`/v1/completions`) and status (`200`), and its duration."""

    def first_token(self, method: str, seconds: float, transport: str = "grpc") -> None:
        """A generation's first token reached the transport `seconds` after its request arrived."""

    def task_request(self, task: str) -> None:
        """A Generate, GenerateStream or Classify request for `task` (empty: the base model) was admitted."""

    def tokens_generated(self, task: str, count: int) -> None:
        """A generation for `task` ended (finished or not) after producing `count` tokens."""

    def queue_wait(self, task: str, seconds: float) -> None:
        """A generation for `task` waited `seconds` in the queue before the worker first took it."""

    def watch(self, snapshot: Callable[[], Snapshot]) -> None:
        """Registers the function that reads the server's state at scrape time."""

    def serve(self, host: str, port: int) -> int:
        """Starts the HTTP endpoint (/metrics); returns the bound port (`port` 0 picks a free one)."""

    def close(self) -> None:
        """Stops the HTTP endpoint, if started."""


class NoMetrics(Metrics):
    """Metrics off: every record is a no-op (the protocol's bodies do nothing)."""

    def serve(self, host: str, port: int) -> int:
        """Refused: nothing to serve."""
        raise RuntimeError("metrics are off: build the app with metrics_port set to serve them")


class TaskLabels:
    """Maps task names to label values, bounded: the first `limit` tasks seen keep their name."""

    def __init__(self, limit: int = MAX_TASK_LABELS) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, task: str) -> str:
        """The label value for `task` (a name, or a `name@version` ref whose version is dropped)."""
        name = task_name(task)
        if not name:
            return BASE_TASK
        with self._lock:
            if name in self._seen:
                return name
            if len(self._seen) < self.limit:
                self._seen.add(name)
                return name
        return OTHER_TASK


def snapshot_reader(scheduler: Scheduler, caches: dict[str, DeviceLru | HostTier],
                    jobs: TrainingJobs) -> Callable[[], Snapshot]:
    """A function reading the serving parts' state for `Metrics.watch`: the scheduler's queue and counters, its
    engine's KV pool, the `caches` (a label to a tier of prompt memory, `prompt_cache.prompt_tiers`) and the
    training jobs."""

    def read() -> Snapshot:
        states = dict.fromkeys(TrainingState, 0)
        for job in jobs.list():
            states[job.state] += 1
        stats = scheduler.stats
        return Snapshot(
            queue_depth=scheduler.queue_depth(),
            batch_size=scheduler.batch_size(),
            decode_steps=stats.steps,
            prefills=stats.prefills,
            training_units=stats.side_units,
            kv_cache=scheduler.engine.kv_usage(),
            preemptions=stats.preemptions,
            share_preemptions=stats.share_preemptions,
            resumed_parked=stats.resumed_parked,
            tasks=scheduler.task_loads(everything=True),
            caches={name: tier.stats() for name, tier in caches.items()},
            training_jobs=states,
        )

    return read
