"""`PrefixWarmer`: computes the prefix keys and values of the versions requests resolve to, while the worker is idle.

A prompt-tuned version's first request computes its virtual tokens' keys and values in its own prefill,
after which they are cached (`Engine.prefixes`, --prefix-cache-mb) and every later request copies them:
a task never served since the start costs its first request those n - 1 extra positions, on a busy CPU
~1.4x a served task's time to first token. After a restart (or a burst of registrations faster than
the worker warms them one by one, `PromptService.warm`), this thread does that work ahead of the
requests: each task's served version and alias targets (`host_tier.serving_order`, the order the host
tier loads them in), a few prompts per forward, only while the worker has no request waiting, running or
being scored, and only while the prefix cache has room without evicting a prefix that is in use. Past
that budget the rest stay cold, and a request for one computes its prefix as before; registrations that come
later are still tried one by one (deleting versions frees their room).

Each group runs on the worker as a side job (`Scheduler.call`), so a request that arrives meanwhile
waits for at most one group's forward (a few tens of positions).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from softprompt.prompts.registry import PromptVersion, Registry
from softprompt.server.core.admission import Admission
from softprompt.server.core.engine import Engine
from softprompt.server.core.errors import ShuttingDownError
from softprompt.server.core.host_tier import HostTierLoader, serving_order
from softprompt.server.core.prompt_cache import Key
from softprompt.server.core.scheduler import Scheduler
from softprompt.server.core.virtual import Prompt

log = logging.getLogger(__name__)

GROUP = 4  # prompts per forward: a request arriving meanwhile waits for one such forward at most
IDLE_POLL_S = 0.05  # how often a busy worker is looked at again


class PrefixWarmer:
    """Warms the served versions' prefixes in a daemon thread started by `start`; `add` queues one more."""

    def __init__(self, registry: Registry, admission: Admission, engine: Engine, scheduler: Scheduler, *,
                 loader: HostTierLoader | None = None) -> None:
        self.registry = registry
        self.admission = admission
        self.engine = engine
        self.scheduler = scheduler
        self.loader = loader  # lists the versions for both, when the server has a host tier
        self.warmed = 0  # prefixes this thread computed
        self.seconds = 0.0  # from start to the end of the start-up pass
        self._queue: deque[PromptVersion] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._full = False  # the prefix cache had no spare room: what is queued then stays cold
        self.filled = False  # warming found the prefix cache full (at least once)
        self.ready = threading.Event()  # set when the start-up pass is over (done, full, or stopped)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="softprompt-prefix-warmer", daemon=True)

    def start(self) -> None:
        """Starts warming in the background; the prefix tier's `pending` is at least 1 until the versions are listed."""
        self.engine.prefixes.pending = 1
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stops warming (what is cached stays) and waits up to `timeout` seconds for the thread."""
        self._stop.set()
        with self._wake:
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def add(self, version: PromptVersion) -> None:
        """Queues a version to warm when the worker is next idle (one registered while the worker was busy)."""
        with self._wake:
            self._queue.append(version)
            self._counted()
            self._wake.notify()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self._listed()
            self._drain()
            self.seconds = time.monotonic() - started
            self.ready.set()
            held, size = self.engine.prefixes.size()
            log.info("prefix warming: %d computed in %.1f s; the prefix cache holds %d (%.1f MiB)%s", self.warmed,
                     self.seconds, held, size / (1 << 20),
                     ": full, the rest compute theirs at their first request" if self.filled else "")
            while not self._stop.is_set():  # then what registrations queue
                with self._wake:
                    while not self._queue and not self._stop.is_set():
                        self._wake.wait()
                self._drain()
        except Exception:  # noqa: BLE001 - a background helper: requests compute their own prefixes
            log.warning("prefix warming stopped; prompts not warmed compute their prefixes at their first request",
                        exc_info=True)
        finally:
            self._counted()
            self.ready.set()

    def _listed(self) -> None:
        """Queues the versions requests resolve to, as the host tier lists them (or listed here without one)."""
        if self.loader is not None:
            while not self.loader.listed.wait(1.0):
                if self._stop.is_set():
                    return
            versions = self.loader.serving
        else:
            versions, _ = serving_order(self.registry, self._stop)
        with self._lock:
            self._queue.extend(versions)
            self._counted()

    def _drain(self) -> None:
        """Warms the queued versions, a group at a time while the worker is idle, until the queue is empty
        or the prefix cache is full."""
        while not self._stop.is_set():
            with self._lock:
                if self._full:  # what is queued now stays cold; what is added later is tried again
                    self._queue.clear()
                    self._full, self.filled = False, True
                group = [self._queue.popleft() for _ in range(min(GROUP, len(self._queue)))]
                self._counted()
            if not group:
                return
            while not self.scheduler.idle():
                if self._stop.wait(IDLE_POLL_S):
                    return
            try:
                warmed, tried = self.scheduler.call(lambda: self._warm(group))
            except ShuttingDownError:
                return
            self.warmed += warmed
            if warmed < tried:
                self._full = True

    def _counted(self) -> None:
        self.engine.prefixes.pending = len(self._queue)  # ModelInfo and /metrics show what is left

    def _warm(self, group: list[PromptVersion]) -> tuple[int, int]:
        """On the worker: the group's prompts resolved and their prefixes computed where the cache has room;
        (computed, that needed computing)."""
        prompts: list[tuple[Prompt, Key]] = []
        for version in group:
            key = (version.name, version.version, version.sha256)
            if self.engine.prefixes.contains(key) or version.method == "prefix":
                continue  # cached already (asked for meanwhile), or keys and values that need no computing
            try:
                prompt, _, key = self.admission.resolve(version.ref)
            except Exception as e:  # noqa: BLE001 - deleted or unreadable: its first request reports it
                log.debug("prefix warming: skipping %s: %s", version.ref, e)
                continue
            if prompt is not None and key is not None:
                prompts.append((prompt, key))
        if not prompts:
            return 0, 0
        return self.engine.warm(prompts, spare_only=True), len(prompts)
