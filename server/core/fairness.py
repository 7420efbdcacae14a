"""Fair share across tasks: which waiting request joins the batch next, which running row gives way to it, and
the per-task limits a request must pass to be queued. The scheduler asks; this module holds no model state.

Order (`FairQueue.ordered`): the most urgent priority first (lower numbers first, as vLLM's `priority`);
within one priority, the fair-share key least served so far; within a key, arrival order, preempted rows
first. A key is the task (default), the caller's token, or one key for all (`off`: arrival order).

Service is counted as in VTC, the Virtual Token Counter of Sheng et al., "Fairness in Serving Large
Language Models" (OSDI '24): each key's counter grows by the weighted tokens computed for it (every
prefilled or scored position INPUT_COST, every generated token OUTPUT_COST, over the task's weight), so
a task with weight 3 is served three times what a task with weight 1 is while both are busy. A key
that comes back from idle is lifted to the least counter of the keys still busy, so nobody banks credit
while away, and two busy keys' counters stay within a bounded distance of each other.

Admission alone cannot help a waiting request when every row is taken by rows that run for a long
time (a flood of long requests admitted together finishes together). So `victim` names a running row
to preempt (parked: it keeps its KV while the pool can spare it and rejoins with one query, else resumes
by recompute with the same tokens, as on a full KV pool): the
newest row of a less urgent priority, or else, when the waiting request's key holds fewer rows than its
weighted share of the batch (and, with `wait` > 0, no row ends within that fraction of its own
max_new_tokens: waiting may save a recompute but delays its first token), the newest row
of the most served key holding more than its own share even after giving one up. Neither rule can undo
the other's choice, so rows never swap back and forth.

Limits (`FairShare.enter`): a task's queued-request cap and its token-rate limit (a bucket of `burst`
tokens refilled at `tokens_per_second`; a request takes its input and max_new_tokens, and gets back
what it did not generate) refuse with `TaskLimitError` (RESOURCE_EXHAUSTED / 429 and a retry delay);
its running-row cap makes its requests wait while the other tasks' go ahead (`ordered` passes them over).
"""

from __future__ import annotations

import enum
import heapq
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from softprompt.prompts.refs import task_name
from softprompt.server.access.callers import Principal
from softprompt.server.core.errors import PriorityNotAllowedError, TaskLimitError
from softprompt.server.core.policy import PolicyFile, PolicyTable, TaskPolicy
from softprompt.server.core.types import TaskLoad

log = logging.getLogger(__name__)

# VTC's defaults: a generated token costs twice a prefilled position (decode steps dominate a row's time).
INPUT_COST = 1.0
OUTPUT_COST = 2.0
RATE_WINDOW_S = 5.0  # the per-task tokens/s shown is an average over about this long
BARE_TASK = "-"  # the bare model's task, as in token and policy patterns
RECENT_S = 60.0  # ModelInfo lists tasks busy now or served within this long
_EPSILON = 1e-9

R = TypeVar("R")


class FairShareKey(str, enum.Enum):
    """What fair share divides the server between (--fair-share)."""

    TASK = "task"  # each task, weighted by --task-policy
    TOKEN = "token"  # each caller's token (weight 1 each; without --auth-tokens everybody is one caller)
    OFF = "off"  # nobody: arrival order (priorities still apply)

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, text: str) -> FairShareKey:
        """The key a --fair-share value names; ValueError listing the choices."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ValueError(f"expected one of {', '.join(k.value for k in cls)}, got {text!r}") from None


class TicketState(enum.Enum):
    """Where a request stands, as its limits count it."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(eq=False)
class Ticket:
    """What fair share knows of one request, from `enter` to `settle`."""

    task: str  # the task's name; BARE_TASK for the bare model
    key: str  # its fair-share key
    priority: int  # lower is served first
    seq: int  # arrival order
    cost: float  # its whole service if it runs to max_new_tokens, unweighted: orders one plan's picks
    reserved: int  # rate-limit tokens taken at entry
    max_new: int  # of those, the tokens it may generate (given back if it does not)
    scoring: bool = False  # a Classify request: charged, limited, but not in the generation queue
    state: TicketState = TicketState.QUEUED


@dataclass
class _Bucket:
    """A token bucket: `level` tokens at `stamp` (time.monotonic())."""

    level: float
    stamp: float

    def refill(self, rate: float, size: float, now: float) -> None:
        self.level = min(size, self.level + (now - self.stamp) * rate)
        self.stamp = now


@dataclass
class _TaskStats:
    """One task's counts: what limits and views read."""

    queued: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    refused: int = 0
    rate: float = 0.0  # tokens/s, decayed to `rate_at`
    rate_at: float = 0.0
    bucket: _Bucket | None = None
    last_seen: float = 0.0


class FairShare:
    """Fair-share counters, per-task limits and the preemption rule, for one scheduler.

    Thread-safe: callers' threads `enter`, the worker charges and settles; one lock guards the counts.
    """

    def __init__(self, policy: PolicyFile | None = None, *, key: FairShareKey = FairShareKey.TASK,
                 preempt: bool = True, wait: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or PolicyFile()
        self.key = key
        self.preempt = preempt
        self.wait = wait  # --fair-preemption-wait: a fraction of the waiting request's max_new_tokens
        self._clock = clock
        self._lock = threading.Lock()
        self._counters: dict[str, float] = {}
        self._active: Counter[str] = Counter()  # generation requests queued or running, per key
        self._last_idle = 0.0  # the counter of the last key to go idle: the floor when no key is busy
        self._tasks: dict[str, _TaskStats] = {}
        self._seq = 0

    # ------------------------------------------------------------------ entry

    def enter(self, task: str, principal: Principal, *, priority: int | None, input_tokens: int,
              max_new: int, scoring: bool = False) -> Ticket:
        """Admits a request past its task's limits, or raises TaskLimitError (queued cap, token rate) or
        PriorityNotAllowedError; returns its ticket, queued."""
        table = self.policy.current()
        policy = table.for_task(task)
        chosen = policy.priority if priority is None else priority
        if priority is not None:
            self._check_priority(priority, principal, table, policy)
        now = self._clock()
        with self._lock:
            stats = self._stats(task, now)
            if policy.max_queued is not None and stats.queued >= policy.max_queued:
                self._refuse(stats, TaskLimitError(
                    f"task {task!r} has {stats.queued} requests queued, its limit (max_queued {policy.max_queued}, "
                    f"--task-policy): retry after 1 s", task=task, limit="max_queued", retry_after_s=1.0))
            reserved = input_tokens + max_new
            self._take_tokens(task, stats, policy, reserved, now)
            key = self._key_of(task, principal)
            if not scoring:
                if not self._active[key]:
                    self._lift(key)
                self._active[key] += 1
            stats.queued += 1
            self._seq += 1
            return Ticket(task, key, chosen, self._seq, input_tokens * INPUT_COST + max_new * OUTPUT_COST,
                          reserved, max_new, scoring)

    def start(self, ticket: Ticket) -> None:
        """The request left the queue to run (a Classify request: to be scored)."""
        with self._lock:
            if ticket.state is TicketState.QUEUED:
                self._tasks[ticket.task].queued -= 1
            ticket.state = TicketState.RUNNING

    def requeue(self, ticket: Ticket) -> None:
        """A running request was preempted: it waits again (it is not refused for the queued cap)."""
        with self._lock:
            if ticket.state is TicketState.RUNNING:
                self._tasks[ticket.task].queued += 1
                ticket.state = TicketState.QUEUED

    def settle(self, ticket: Ticket, generated: int = 0) -> None:
        """The request ended (finished, failed, cancelled): the rate tokens it did not use go back."""
        with self._lock:
            if ticket.state is TicketState.DONE:
                return
            stats = self._tasks[ticket.task]
            if ticket.state is TicketState.QUEUED:
                stats.queued -= 1
            ticket.state = TicketState.DONE
            if stats.bucket is not None:
                policy = self.policy.current().for_task(ticket.task)
                stats.bucket.level = min(policy.bucket_size, stats.bucket.level + max(0, ticket.max_new - generated))
            if not ticket.scoring:
                self._active[ticket.key] -= 1
                if not self._active[ticket.key]:
                    del self._active[ticket.key]
                    self._last_idle = self._counters.get(ticket.key, 0.0)

    # ------------------------------------------------------------------ service

    def charge(self, work: Iterable[tuple[Ticket, int, int]]) -> None:
        """Counts service: (ticket, positions prefilled or scored, tokens generated) for each row worked on."""
        now = self._clock()
        table = self.policy.current()
        with self._lock:
            for ticket, positions, generated in work:
                cost = positions * INPUT_COST + generated * OUTPUT_COST
                self._counters[ticket.key] = self._counters.get(ticket.key, 0.0) + cost / self._weight(ticket.key, table)
                stats = self._stats(ticket.task, now)
                stats.input_tokens += positions
                stats.output_tokens += generated
                stats.rate = stats.rate * math.exp(-(now - stats.rate_at) / RATE_WINDOW_S) + \
                    (positions + generated) / RATE_WINDOW_S
                stats.rate_at = now

    def counters(self) -> dict[str, float]:
        """Each key's weighted service so far (a copy)."""
        with self._lock:
            return dict(self._counters)

    def weight(self, key: str) -> float:
        """A key's weight: its task's with --fair-share task, else 1."""
        return self._weight(key, self.policy.current())

    def at_cap(self, task: str, running: int) -> bool:
        """Whether `task`, holding `running` rows, is at its max_running cap."""
        cap = self.policy.current().for_task(task).max_running
        return cap is not None and running >= cap

    # ------------------------------------------------------------------ preemption

    def victim(self, head: Ticket, running: Sequence[Ticket], rows: int, waiting_keys: Iterable[str], *,
               frees_in: int | None = None) -> int | None:
        """The index in `running` (oldest row first) of the row to preempt so that `head`, the first request
        in fair order, can join; None if no row should give way. `rows`: the rows the batch may hold;
        `waiting_keys`: the keys with requests waiting at head's priority; `frees_in`: decode steps until
        the first running row reaches its max_new_tokens (None: unknown)."""
        if not self.preempt or not running:
            return None
        least_urgent = max(t.priority for t in running)
        if least_urgent > head.priority:
            return max(i for i, t in enumerate(running) if t.priority == least_urgent)
        if self.key is FairShareKey.OFF:
            return None
        if self.wait > 0 and frees_in is not None and frees_in <= max(1, int(head.max_new * self.wait)):
            # A row frees soon enough anyway: waiting for it costs head a small part of its own decode, and
            # costs nobody a recompute (under a steady flood some row ends every few steps).
            return None
        level = [(i, t) for i, t in enumerate(running) if t.priority == head.priority]
        held = Counter(t.key for _, t in level)
        table = self.policy.current()
        busy = {*held, *waiting_keys, head.key}
        total = sum(self._weight(k, table) for k in busy)
        room = rows - sum(t.priority < head.priority for t in running)  # rows more urgent requests hold stay theirs

        def share(key: str) -> int:
            # Rounded up: a key entitled to a fraction of a row (many busy keys) may still hold one.
            return math.ceil(room * self._weight(key, table) / total - _EPSILON)

        if held[head.key] >= share(head.key):
            return None
        counters = self.counters()
        mine = counters.get(head.key, 0.0)
        # Over its share even after giving one row up, so it cannot take that row back.
        over = [k for k in held if k != head.key and held[k] - 1 >= share(k) and counters.get(k, 0.0) >= mine]
        if not over:
            return None
        most_served = max(over, key=lambda k: counters.get(k, 0.0))
        return max(i for i, t in level if t.key == most_served)

    # ------------------------------------------------------------------ views

    def loads(self, running: Sequence[Ticket], *, everything: bool = False) -> tuple[TaskLoad, ...]:
        """Each task's load now: those running, queued or served within RECENT_S (`everything`: every task
        seen since start, for counters that must not vanish)."""
        now = self._clock()
        table = self.policy.current()
        rows = Counter(t.task for t in running)
        with self._lock:
            busy = {task for task, s in self._tasks.items() if s.queued or rows[task]}
            total = sum(table.for_task(task).weight for task in busy) or 1.0
            out = []
            for task, s in sorted(self._tasks.items()):
                if not everything and task not in busy and now - s.last_seen > RECENT_S:
                    continue
                policy = table.for_task(task)
                out.append(TaskLoad(
                    task=task, running=rows[task], queued=s.queued,
                    share=rows[task] / len(running) if running else 0.0,
                    fair_share=policy.weight / total if task in busy else 0.0,
                    weight=policy.weight, priority=policy.priority,
                    tokens_per_second=s.rate * math.exp(-(now - s.rate_at) / RATE_WINDOW_S),
                    input_tokens=s.input_tokens, output_tokens=s.output_tokens, refused=s.refused))
        return tuple(out)

    # ------------------------------------------------------------------ internals

    def _key_of(self, task: str, principal: Principal) -> str:
        if self.key is FairShareKey.TASK:
            return task
        if self.key is FairShareKey.TOKEN:
            return principal.identity
        return ""

    def _weight(self, key: str, table: PolicyTable) -> float:
        return table.for_task(key).weight if self.key is FairShareKey.TASK else 1.0

    def _lift(self, key: str) -> None:
        """A key coming back from idle starts level with the least served busy key (VTC): no banked credit."""
        busy = [self._counters.get(k, 0.0) for k in self._active]
        floor = min(busy) if busy else self._last_idle
        self._counters[key] = max(self._counters.get(key, 0.0), floor)

    def _stats(self, task: str, now: float) -> _TaskStats:
        stats = self._tasks.get(task)
        if stats is None:
            stats = self._tasks[task] = _TaskStats(rate_at=now)
        stats.last_seen = now
        return stats

    def _take_tokens(self, task: str, stats: _TaskStats, policy: TaskPolicy, tokens: int, now: float) -> None:
        """Takes `tokens` from the task's bucket; a request larger than the bucket waits for a full one."""
        rate = policy.tokens_per_second
        if rate is None:
            stats.bucket = None
            return
        size = policy.bucket_size
        if stats.bucket is None:
            stats.bucket = _Bucket(size, now)
        stats.bucket.refill(rate, size, now)
        need = min(tokens, size)
        if stats.bucket.level < need:
            wait = (need - stats.bucket.level) / rate
            self._refuse(stats, TaskLimitError(
                f"task {task!r} is over its token rate ({rate:g} tokens/s, burst {size:g}; --task-policy): this "
                f"request takes {tokens} tokens (input + max_new_tokens): retry after {math.ceil(wait)} s",
                task=task, limit="tokens_per_second", retry_after_s=wait))
        stats.bucket.level -= tokens

    def _refuse(self, stats: _TaskStats, error: TaskLimitError) -> None:
        stats.refused += 1
        log.warning("refused a request for task %s: over its %s limit (retry after %.1f s)", error.task,
                    error.limit, error.retry_after_s)
        raise error

    @staticmethod
    def _check_priority(priority: int, principal: Principal, table: PolicyTable, policy: TaskPolicy) -> None:
        floor = table.priority_floor(principal.role)
        if floor is None or priority >= min(floor, policy.priority):
            return
        role = "a server without tokens" if principal.role is None else f"a token with the {principal.role.value} role"
        raise PriorityNotAllowedError(
            f"priority {priority} is more urgent than {role} may ask for (at most {min(floor, policy.priority)}; "
            "lower is served first): leave priority out for the task's default")


@dataclass
class FairQueue(Generic[R]):
    """The waiting requests: per priority, per fair-share key, in arrival order (preempted ones in front).

    Not thread-safe: the scheduler guards it with its own lock.
    """

    ticket_of: Callable[[R], Ticket]
    _levels: dict[int, dict[str, deque[R]]] = field(default_factory=dict)
    _size: int = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[R]:
        """Every waiting request, in no particular order (`ordered` gives the order they join in)."""
        for keys in self._levels.values():
            for waiting in keys.values():
                yield from waiting

    def push(self, item: R) -> None:
        """Queues an arrival behind its key's other requests."""
        self._deque(item).append(item)
        self._size += 1

    def push_front(self, items: Sequence[R]) -> None:
        """Puts preempted requests back in front of their keys' others, in the order given."""
        for item in reversed(items):
            self._deque(item).appendleft(item)
            self._size += 1

    def remove(self, item: R) -> None:
        """Takes a request out (it joins the batch, or was cancelled)."""
        t = self.ticket_of(item)
        keys = self._levels[t.priority]
        keys[t.key].remove(item)
        self._size -= 1
        if not keys[t.key]:
            del keys[t.key]
            if not keys:
                del self._levels[t.priority]

    def clear(self) -> list[R]:
        """Empties the queue; returns what it held."""
        items = list(self)
        self._levels.clear()
        self._size = 0
        return items

    def keys(self, priority: int) -> Iterable[str]:
        """The keys with requests waiting at `priority`."""
        return self._levels.get(priority, {}).keys()

    def ordered(self, share: FairShare, running: Sequence[Ticket]) -> Iterator[R]:
        """The waiting requests in the order they join: the most urgent priority first; within one, the key
        least served (ties: the one holding fewer rows, then the earlier arrival), each pick then counted at
        its whole cost so that one prefill interleaves keys by weight; within a key, queue order. A request
        whose task is at its max_running cap (with `running` and those picked before it) is passed over.

        Lazy: take what is needed (`itertools.islice`) before changing the queue.
        """
        counters = share.counters()
        held = Counter(t.key for t in running)
        tasks = Counter(t.task for t in running)
        capped: set[str] = set()  # tasks at their cap: their rows only grow while this runs, so they stay there

        def at_cap(item: R) -> bool:
            task = self.ticket_of(item).task
            if task not in capped and share.at_cap(task, tasks[task]):
                capped.add(task)
            return task in capped

        def first_free(rest: Iterator[R]) -> R | None:
            # Each key's queue is walked once per call (an iterator, not by index): a capped task's backlog
            # is passed over in one sweep.
            return next((item for item in rest if not at_cap(item)), None)

        for priority in sorted(self._levels):
            keys = self._levels[priority]
            rests = {k: iter(q) for k, q in keys.items()}
            heap: list[tuple[float, int, int, str, R]] = []
            for k in keys:
                if (item := first_free(rests[k])) is not None:
                    heap.append((counters.get(k, 0.0), held[k], self.ticket_of(item).seq, k, item))
            heapq.heapify(heap)  # seq is unique: ties never compare the items
            while heap:
                served, rows, _, key, item = heapq.heappop(heap)
                if at_cap(item):  # its task reached its cap through another key's pick (--fair-share token, off)
                    if (item := first_free(rests[key])) is not None:
                        heapq.heappush(heap, (served, rows, self.ticket_of(item).seq, key, item))
                    continue
                ticket = self.ticket_of(item)
                yield item
                tasks[ticket.task] += 1
                if (following := first_free(rests[key])) is not None:
                    heapq.heappush(heap, (served + ticket.cost / share.weight(key), rows + 1,
                                          self.ticket_of(following).seq, key, following))

    def _deque(self, item: R) -> deque[R]:
        t = self.ticket_of(item)
        return self._levels.setdefault(t.priority, {}).setdefault(t.key, deque())


def task_of(prompt_version: str) -> str:
    """The task a version runs for, as fair share and policies name it ("name@3" -> "name"; BARE_TASK)."""
    return task_name(prompt_version) or BARE_TASK
