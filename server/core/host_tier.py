"""`HostTierLoader`: fills the host tier with every stored version's prompt matrix, in the background, at start.

A server that restarts on a registry of many tasks is ready at once; meanwhile this thread lists every
version (which also leaves each version's metadata in the store view, so resolving a task never served
reads only its version list) and reads each matrix into the host tier (`prompt_cache.HostTier`): the
versions requests resolve to first (each task's newest version that is no candidate, and alias targets),
then the older ones, until all are held or the tier's budget is full. Past the budget nothing more is
read ahead (the tier would only evict what it just read): those versions are read from the store at their
first request and then kept, least recently used evicted first.

It runs at most `duty` of one core, sleeping between chunks, so a busy server's serving threads keep the
interpreter; a version it cannot read (damaged, deleted meanwhile, store unreachable) is skipped with a
warning and read, or reported, by its first request as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from softprompt.prompts.registry import MAX_PAGE_SIZE, PromptVersion, Registry
from softprompt.server.core.prompt_cache import HostTier

log = logging.getLogger(__name__)

CHUNK = 64  # versions read between two checks of the duty cycle and of stop()


class HostTierLoader:
    """Reads every stored version's matrix into `tier`, in a daemon thread started by `start`."""

    def __init__(self, registry: Registry, tier: HostTier, *, duty: float = 0.5) -> None:
        if not 0 < duty <= 1:
            raise ValueError(f"duty must be in (0, 1], got {duty}")
        self.registry = registry
        self.tier = tier
        self.duty = duty
        self.loaded = 0
        self.seconds = 0.0  # from start to done
        self.serving: list[PromptVersion] = []  # each task's served version and alias targets, once listed
        self.listed = threading.Event()  # set once `serving` is (or loading stopped before it was)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="softprompt-host-tier", daemon=True)

    def start(self) -> None:
        """Starts loading in the background; the tier's `pending` is at least 1 from now until it is done."""
        self.tier.pending = 1
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stops loading (what is held stays) and waits up to `timeout` seconds for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Waits up to `timeout` seconds for the load to finish; returns whether it has."""
        self._thread.join(timeout)
        return self.done()

    def done(self) -> bool:
        """Whether loading finished (or was stopped)."""
        return not self._thread.is_alive() and self._thread.ident is not None

    def _run(self) -> None:
        started = time.monotonic()
        try:
            first, rest = serving_order(self.registry, self._stop, self._listing)
            self.serving = first
            self.listed.set()
            order = first + rest
            self.tier.pending = len(order)
            self._load(order)
        except Exception:  # noqa: BLE001 - a background helper: serving goes on, reading from the store
            log.warning("the host tier's background load stopped; versions not held are read from the store "
                        "at their first request", exc_info=True)
        finally:
            self.listed.set()
            self.tier.pending = 0
            self.seconds = time.monotonic() - started
        log.info("host tier: %d versions loaded in %.1f s (%d held, %.1f MiB)", self.loaded, self.seconds,
                 *self._held())

    def _held(self) -> tuple[int, float]:
        entries, size = self.tier.lru.size()
        return entries, size / (1 << 20)

    def _listing(self, count: int) -> None:
        self.tier.pending = count + 1  # + 1: still listing

    def _load(self, order: list[PromptVersion]) -> None:
        for start in range(0, len(order), CHUNK):
            if self._stop.is_set():
                return
            began = time.monotonic()
            for index, version in enumerate(order[start:start + CHUNK], start):
                self.tier.pending -= 1
                key = (version.name, version.version, version.sha256)
                if self.tier.contains(key):
                    continue  # registered (or asked for) meanwhile
                try:
                    tensor = self.registry.load_embeddings(version)
                except Exception as e:  # noqa: BLE001 - its first request reads (or reports) it instead
                    log.warning("host tier: skipping %s: %s", version.ref, e)
                    continue
                if not self.tier.fits(tensor):
                    entries, mib = self._held()
                    log.info("host tier full (%d versions, %.1f MiB): %d versions left to the store, read at "
                             "their first request", entries, mib, len(order) - index)
                    return
                self.tier.put(key, tensor)
                self.loaded += 1
            # At most `duty` of one core: sleep as long again as the chunk took, scaled.
            self._stop.wait((time.monotonic() - began) * (1 - self.duty) / self.duty)


def serving_order(registry: Registry, stop: threading.Event, progress: Callable[[int], None] = lambda count: None
                  ) -> tuple[list[PromptVersion], list[PromptVersion]]:
    """Every stored version, listed page by page until `stop` is set: those requests resolve to (each task's
    served version, alias targets) and the rest. `progress` hears the count listed so far."""
    first: list[PromptVersion] = []
    rest: list[PromptVersion] = []
    served: set[str] = set()
    token = ""
    while not stop.is_set():
        page, token = registry.list_page(None, MAX_PAGE_SIZE, token)
        for version in page:
            # A task's versions come newest first: its first that is no candidate is what its name means.
            serves = version.name not in served and not version.candidate
            if serves:
                served.add(version.name)
            (first if serves or version.aliases else rest).append(version)
        progress(len(first) + len(rest))
        if not token:
            break
    return first, rest
