"""`Metrics` for Prometheus: counters and histograms fed per request, gauges read at scrape time, /metrics over HTTP.

Imported only when --metrics-port is given (prometheus_client is optional). Each instance has its
own CollectorRegistry, so several servers in one process (tests) never share or clash on series.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from softprompt.server.observability.metrics import Snapshot, TaskLabels

# Whole RPCs run from milliseconds (admin calls) to minutes (long generations, watched training jobs).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# The first token waits for admission, the queue and one prefill: usually well under a second.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A queue wait is nothing for a task under its share, up to minutes for one flooding the server.
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


HTTP_SERVICE = "openai"  # the `service` label of the HTTP API's routes


def _split(method: str, transport: str) -> tuple[str, str]:
    """`/softprompt.v1.Inference/Generate` -> (`softprompt.v1.Inference`, `Generate`); an HTTP route stays whole."""
    if transport != "grpc":
        return HTTP_SERVICE, method
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class _StateCollector:
    """Turns a scrape-time `Snapshot` into metric families."""

    def __init__(self, read: Callable[[], Snapshot], tasks: TaskLabels) -> None:
        self._read = read
        self._tasks = tasks

    def describe(self) -> list[Metric]:
        # Declaring nothing keeps registration from calling collect() before the server runs.
        return []

    def collect(self) -> Iterator[Metric]:
        s = self._read()
        yield GaugeMetricFamily("softprompt_queue_depth", "Requests waiting to join the batch or to be scored",
                                value=s.queue_depth)
        yield GaugeMetricFamily("softprompt_batch_size", "Requests in the running (decoding) batch",
                                value=s.batch_size)
        yield CounterMetricFamily("softprompt_decode_steps", "Decode steps run over the batch", value=s.decode_steps)
        yield CounterMetricFamily("softprompt_prefills", "Prefill forwards run for arriving requests",
                                  value=s.prefills)
        yield CounterMetricFamily("softprompt_preemptions",
                                  "Running requests preempted (KV dropped, recomputed when they resume)",
                                  value=s.preemptions)
        yield CounterMetricFamily("softprompt_share_preemptions",
                                  "Running requests that gave way to a more urgent request or a task under its "
                                  "fair share (their KV kept while the pool can spare it)", value=s.share_preemptions)
        yield CounterMetricFamily("softprompt_resumed_parked",
                                  "Requests that rejoined the batch with the KV they kept when they gave way "
                                  "(one query instead of recomputing)", value=s.resumed_parked)
        yield from _task_loads(s, self._tasks)
        yield from _kv_cache(s)
        yield CounterMetricFamily("softprompt_training_units", "Units of training work run on the worker",
                                  value=s.training_units)
        families = {
            "hits": CounterMetricFamily("softprompt_cache_hits", "Cache lookups that found their entry",
                                        labels=["cache"]),
            "misses": CounterMetricFamily("softprompt_cache_misses", "Cache lookups that did not",
                                          labels=["cache"]),
            "loads": CounterMetricFamily("softprompt_cache_loads",
                                         "Entries made after a miss and kept, or put ahead of one (host: read "
                                         "from the registry, at registration or by the background load; prompt: "
                                         "moved to the device; prefix: keys/values computed)", labels=["cache"]),
            "entries": GaugeMetricFamily("softprompt_cache_entries", "Entries held", labels=["cache"]),
            "bytes": GaugeMetricFamily("softprompt_cache_bytes",
                                       "Bytes held (host: host memory; prompt and prefix: device memory)",
                                       labels=["cache"]),
            "capacity_bytes": GaugeMetricFamily("softprompt_cache_capacity_bytes",
                                                "The tier's budget in bytes (--host-cache-mb, --prompt-cache-mb, "
                                                "--prefix-cache-mb)", labels=["cache"]),
            "evictions": CounterMetricFamily("softprompt_cache_evictions",
                                             "Entries dropped to stay within the budget (least recently used)",
                                             labels=["cache"]),
            "pending": GaugeMetricFamily("softprompt_cache_pending",
                                         "Versions the host tier's background load has still to read, or "
                                         "whose prefixes idle-time warming has still to look at",
                                         labels=["cache"]),
            # Since start, as ModelInfo gives it; a recent window's is rate(hits) / (rate(hits) + rate(misses)).
            "hit_rate": GaugeMetricFamily("softprompt_cache_hit_ratio",
                                          "Lookups that found their entry per lookup, since start (0 before the "
                                          "first)", labels=["cache"]),
        }
        for name, counts in s.caches.items():
            for field, family in families.items():
                family.add_metric([name], getattr(counts, field))
        yield from families.values()
        jobs = GaugeMetricFamily("softprompt_training_jobs", "Training jobs the server remembers, by state",
                                 labels=["state"])
        for state, count in s.training_jobs.items():
            jobs.add_metric([state.value], count)
        yield jobs


def _task_loads(s: Snapshot, labels: TaskLabels) -> Iterator[Metric]:
    """Per-task fair-share state, under the bounded task labels (tasks past the bound add up under _other)."""
    values: dict[str, list[float]] = {}
    for load in s.tasks:
        row = values.setdefault(labels(load.task if load.task != "-" else ""), [0.0] * 7)
        for i, v in enumerate((load.running, load.queued, load.share, load.fair_share, load.input_tokens,
                               load.output_tokens, load.refused)):
            row[i] += v
    running = GaugeMetricFamily("softprompt_task_running", "Rows a task holds in the batch", labels=["task"])
    queued = GaugeMetricFamily("softprompt_task_queued", "Requests of a task waiting", labels=["task"])
    share = GaugeMetricFamily("softprompt_task_share", "Fraction of the running rows a task holds now",
                              labels=["task"])
    fair = GaugeMetricFamily("softprompt_task_fair_share",
                             "Fraction of the server a task's weight entitles it to among the busy tasks",
                             labels=["task"])
    served = CounterMetricFamily("softprompt_task_served_tokens",
                                 "Tokens computed for a task: input (positions prefilled or scored, recomputed ones "
                                 "included) and output (generated)", labels=["task", "kind"])
    refused = CounterMetricFamily("softprompt_task_refused",
                                  "Requests refused by a task's limits (queued cap, token rate)", labels=["task"])
    for task, (r, q, sh, fs, inp, out, ref) in values.items():
        running.add_metric([task], r)
        queued.add_metric([task], q)
        share.add_metric([task], sh)
        fair.add_metric([task], fs)
        served.add_metric([task, "input"], inp)
        served.add_metric([task, "output"], out)
        refused.add_metric([task], ref)
    yield from (running, queued, share, fair, served, refused)


def _kv_cache(s: Snapshot) -> Iterator[Metric]:
    """The KV pool's gauges: blocks by state, rows holding them, the pool's size."""
    kv = s.kv_cache
    blocks = GaugeMetricFamily("softprompt_kv_cache_blocks",
                               "KV cache blocks of fixed token slots, held by running requests (used) or not (free)",
                               labels=["state"])
    blocks.add_metric(["used"], kv.used_blocks)
    blocks.add_metric(["free"], kv.free_blocks)
    yield blocks
    yield GaugeMetricFamily("softprompt_kv_cache_rows",
                            "Requests holding KV cache blocks (decoding, or part way through a chunked prefill)",
                            value=kv.rows)
    # Not *_total: that suffix is the counters' (promtool flags a gauge carrying it).
    yield GaugeMetricFamily("softprompt_kv_cache_capacity_bytes",
                            "Bytes of the KV cache's usable blocks, reserved at startup (--kv-cache-memory)",
                            value=kv.total_bytes)


class PrometheusMetrics:
    """The Prometheus `Metrics`: see README, Observability, for every name."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._tasks = TaskLabels()
        r = self.registry
        self._rpcs = Counter("softprompt_rpc_requests",
                             "Requests finished, by transport (grpc, http), service, method (HTTP: route) and "
                             "status code", ["transport", "service", "method", "code"], registry=r)
        self._latency = Histogram("softprompt_rpc_duration_seconds", "Request duration, from arrival to status",
                                  ["transport", "service", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self._ttft = Histogram("softprompt_time_to_first_token_seconds",
                               "From a generation request's arrival to its first token", ["transport", "method"],
                               buckets=TTFT_BUCKETS, registry=r)
        self._tokens = Counter("softprompt_generated_tokens", "Tokens generated, all tasks", registry=r)
        self._task_requests = Counter("softprompt_task_requests",
                                      "Generate, GenerateStream and Classify requests admitted, by task", ["task"],
                                      registry=r)
        self._task_tokens = Counter("softprompt_task_generated_tokens", "Tokens generated, by task", ["task"],
                                    registry=r)
        self._queue_wait = Histogram("softprompt_task_queue_wait_seconds",
                                     "From a generation's arrival to the worker first taking it, by task", ["task"],
                                     buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def rpc_done(self, method: str, code: str, seconds: float, transport: str = "grpc") -> None:
        """Counts an ended request and records its duration."""
        service, name = _split(method, transport)
        self._rpcs.labels(transport, service, name, code).inc()
        self._latency.labels(transport, service, name).observe(seconds)

    def first_token(self, method: str, seconds: float, transport: str = "grpc") -> None:
        """Records a generation's time to first token."""
        self._ttft.labels(transport, _split(method, transport)[1] or method).observe(seconds)

    def task_request(self, task: str) -> None:
        """Counts an admitted request under its (bounded) task label."""
        self._task_requests.labels(self._tasks(task)).inc()

    def tokens_generated(self, task: str, count: int) -> None:
        """Adds a generation's tokens, in total and under its task label."""
        if count:
            self._tokens.inc(count)
            self._task_tokens.labels(self._tasks(task)).inc(count)

    def queue_wait(self, task: str, seconds: float) -> None:
        """Records how long a generation waited in the queue, under its task label."""
        self._queue_wait.labels(self._tasks(task)).observe(seconds)

    def watch(self, snapshot: Callable[[], Snapshot]) -> None:
        """Registers the scrape-time reader of queue, batch, cache, fair-share and training-job state."""
        self.registry.register(_StateCollector(snapshot, self._tasks))

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics on `host:port` in a daemon thread; returns the bound port."""
        # gRPC takes "[::]"; the HTTP server wants the bare address.
        self._httpd, self._thread = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        return int(self._httpd.server_port)

    def close(self) -> None:
        """Stops serving /metrics and frees the port."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._httpd = self._thread = None
