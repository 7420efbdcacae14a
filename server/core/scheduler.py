"""Queues admitted requests and runs them in one continuously batched loop on a single worker thread.

The worker owns the model. Each iteration it drops rows whose client left or whose deadline
passed, runs one forward of Classify label rows (`scoring`), one prefill (newly arrived requests
of any tasks, or one chunk of a row longer than the prefill budget: `planning`) and merges the
rows whose prefill is complete into the running batch, then decodes one token for every row. A
request joins at the next step and leaves the moment it finishes; nothing waits for a whole batch
to drain, and no long prompt or burst of Classify requests holds the running streams for more
than a budget's worth of work per token. Where the engine runs mixed steps (`Engine.fuses_steps`: the
CPU's paged kernel), that prefill or chunk runs inside the decode step's own forward (`_mixed_step`),
so the model's weights are read once for both; if that forward raises, the same work runs apart.

Rows are admitted by KV capacity, never into an out-of-memory cascade, and the scheduler asks one
question about it: the engine's KV manager's `allocate_slots(row, tokens)`, which gives a row blocks
of the pool or says no. Each step, the Classify rows of the next scoring forward ask first (they give
their blocks back within the step), then waiting rows, in fair-share order (`fairness`: the most urgent
priority, then the least served task, then arrival), for the blocks of their prefill and first step (the
manager keeps one block per running row in reserve, so the running rows can grow a while without
preemption); a row told no waits, and holds back those behind it. When the first waiting row finds no
free row or no blocks (`joining`), fair share may name a running row that gives way to it (a less urgent one, or
the newest of a task over its share while the waiting one's task is under): it steps out parked, keeping
its blocks while the pool can spare them (`Engine.set_aside`), and rejoins with one query (by recompute if
the pool took them). Before each decode step every running row asks for room for its next token, oldest
first; when the answer is no, the newest row gives its blocks back (preemption: it goes back to the front
of the queue and resumes later by recompute, with the same tokens; a row half way through a chunked
prefill goes first) and the question is asked again. A request that could never fit the pool alone is
refused at admission.

One request's failure never fails the others. A prefill that raises is retried one row at a time,
and only a row that fails alone gets the error. A decode step that raises (the device out of
memory, typically) preempts the newest half of the rows and is retried with the rest, down to a
single row, which then fails alone. Until the batch next empties, admission stops at the size that
last ran, so preempted rows rejoin as others finish instead of failing again.

Training jobs hand the worker small units of model work (`call`). An idle worker runs them back
to back; while requests are being served they get at most `side_share` of the worker's time, one
unit between two decode steps, so serving slows by a bounded share instead of stalling.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from softprompt.server.core.admission import Admitted, AdmittedScoring
from softprompt.server.core.engine import Batch, Engine, PartialPrefill, Sequence, TokenEvent
from softprompt.server.core.fairness import FairShare, task_of
from softprompt.server.core.handle import Failed, Handle
from softprompt.server.core.joining import Joining
from softprompt.server.core.errors import CancelledError, DeadlineError, OverloadedError, ShuttingDownError
from softprompt.server.core.pool import KvPoolFullError
from softprompt.server.core.scoring import ScoringJob
from softprompt.server.core.snapshot import RowSnapshot, SchedulerSnapshot, SchedulerStats
from softprompt.server.core.worker_state import Request, SideJob, Work, WorkerState
from softprompt.server.core.types import StreamChunk, TaskLoad, Usage

log = logging.getLogger(__name__)

T = TypeVar("T")


class Scheduler:
    """Admission queue plus the worker loop; thread-safe `submit`."""

    def __init__(self, engine: Engine, *, max_batch_size: int, max_queued: int, max_prefill_tokens: int,
                 batch_wait_s: float = 0.0, side_share: float = 0.25, fair: FairShare | None = None) -> None:
        self.engine = engine
        self.fair = fair or FairShare()
        self.side_share = side_share
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.max_prefill_tokens = max_prefill_tokens
        self.batch_wait_s = batch_wait_s
        self.stats = SchedulerStats()
        self._state = WorkerState()
        self._joining = Joining(engine, self.fair, self._state, self.stats, lambda rows: self._preempt(rows, None))
        self._cond = threading.Condition()
        self._closed = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="softprompt-worker", daemon=True)

    def start(self) -> None:
        """Starts the worker thread."""
        self._thread.start()

    def submit(self, admitted: Admitted) -> Handle:
        """Queues a request; raises OverloadedError when the queue is full or its task is over a limit
        (TaskLimitError), PriorityNotAllowedError for a priority its caller may not ask for."""
        handle = Handle(admitted.sequence.request_id, admitted.prompt_version, self._withdraw)
        seq = admitted.sequence
        with self._cond:
            self._check_room()
            ticket = self.fair.enter(task_of(admitted.prompt_version), admitted.principal, priority=admitted.priority,
                                     input_tokens=len(seq.input_ids), max_new=seq.params.max_new_tokens)
            self._state.waiting.push(Request(admitted, handle, ticket))
            self._cond.notify()
        return handle

    def submit_scoring(self, admitted: AdmittedScoring) -> Future[list[float]]:
        """Queues a Classify request; the future gives each label's log-probability (cancel() drops it)."""
        tokens = len(admitted.input_ids) + sum(len(ids) for ids in admitted.label_ids)
        with self._cond:
            self._check_room()
            ticket = self.fair.enter(task_of(admitted.prompt_version), admitted.request.principal, priority=None,
                                     input_tokens=tokens, max_new=0, scoring=True)
            job = ScoringJob(admitted, Future(), ticket)
            self._state.scoring.append(job)
            self._cond.notify()
        return job.future

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Runs `fn` on the worker thread (which owns the model) between serving steps; returns its result.

        Past `timeout` seconds raises TimeoutError; `fn` still runs when the worker gets to it.
        """
        job = SideJob(fn, Future())
        with self._cond:
            if self._closed:
                raise ShuttingDownError("the server is shutting down: training stopped")
            self._state.side.append(job)
            self._cond.notify()
        return job.future.result(timeout)

    def _withdraw(self, handle: Handle) -> None:
        """Takes a cancelled request out of the queue, so it stops holding a queue slot while the batch is full."""
        with self._cond:
            request = next((r for r in self._state.waiting if r.handle is handle), None)
            if request is None:
                return  # taken by the worker: dropped at its next step
            self._state.waiting.remove(request)
            # A row that gave way may still hold parked blocks, which only the worker gives back (it may be taking
            # them back for another row right now): it frees them at its next step.
            self._state.abandoned.append(request.sequence)
            self._cond.notify()
        self._fail(request, CancelledError("the client cancelled the request"), release=False)

    def snapshot(self) -> SchedulerSnapshot:
        """What is queued, running and held now (a consistent view of the queues; rows as last stepped)."""
        with self._cond:
            state = self._state
            rows = list(state.running.values())
            tickets = [r.ticket for r in rows]
            waiting = state.waiting_in_order(self.fair, tickets)
            scoring_queued, side = len(state.scoring), len(state.side)
        running = tuple(RowSnapshot(r.sequence.request_id, len(r.sequence.generated), len(r.sequence.kv.blocks))
                        for r in rows)
        chunking = None if state.partial is None else state.partial[0].sequence.request_id
        return SchedulerSnapshot(waiting, running, chunking, scoring_queued, len(state.scored), side,
                                 state.row_cap, self.engine.kv_usage(), dataclasses.replace(self.stats),
                                 self.fair.loads(tickets))

    def task_loads(self, *, everything: bool = False) -> tuple[TaskLoad, ...]:
        """Each task's rows, queue, share and service (a lock-free read, for ModelInfo and metrics)."""
        return self.fair.loads([r.ticket for r in list(self._state.running.values())], everything=everything)

    def in_worker(self) -> bool:
        """Whether the calling thread is the worker (the one thread that runs the model)."""
        return threading.current_thread() is self._thread

    def queue_depth(self) -> int:
        """Requests waiting to join the batch or to be scored."""
        return len(self._state.waiting) + len(self._state.scoring)

    def idle(self) -> bool:
        """Whether no request is waiting, running or being scored and no side job is queued (a lock-free read:
        background helpers look before they hand the worker work that may wait)."""
        return not self._state.busy()

    def batch_size(self) -> int:
        """Requests in the running batch (a lock-free read, for metrics)."""
        return len(self._state.running)

    def _check_room(self) -> None:
        if self._closed:
            raise ShuttingDownError("the server is shutting down and takes no new requests: retry on another replica")
        if self.queue_depth() >= self.max_queued:
            raise OverloadedError(
                f"the server is at capacity ({self.queue_depth()} requests queued): retry with backoff"
            )

    def stop_admitting(self) -> None:
        """Refuses new requests and side jobs from now on (ShuttingDownError); queued and running ones go on."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def close(self, grace_s: float = 0.0) -> None:
        """Stops taking requests, lets running ones finish for up to `grace_s`, then fails the rest."""
        self.stop_admitting()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self._state.waiting or self._state.running or self._state.scoring
                                               or self._state.scored):
            time.sleep(0.01)
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        else:
            self._fail_remaining()

    # ------------------------------------------------------------------ worker

    def _run(self) -> None:
        batch: Batch | None = None
        while True:
            work = self._take_work(batch)
            if work is None:
                break
            batch = work.batch
            started = time.monotonic()
            self._charge_scoring()
            self._state.scored.run_one(self.engine)
            try:
                batch = self._step(batch, work.new)
            except Exception as exc:  # noqa: BLE001 - a bug outside any row's model work must not kill the server
                victims = {id(h): h for h in [*self._state.running.values(), *work.new]}
                log.exception("engine step failed; failing %d requests", len(victims))
                self.engine.release([h.sequence for h in victims.values()])
                for handle in victims.values():
                    self._fail(handle, exc)
                batch, self._state.partial = None, None
            if batch is None:
                self._state.row_cap = None
            self._state.serve_s += time.monotonic() - started
            if work.side is not None:
                self._run_side(work.side)
        self._fail_remaining()

    def _run_side(self, job: SideJob) -> None:
        started = time.monotonic()
        try:
            job.future.set_result(job.fn())
        except BaseException as exc:  # noqa: BLE001 - the caller (a training job) decides what failed
            job.future.set_exception(exc)
        self._state.last_side_s = time.monotonic() - started
        self._state.side_s += self._state.last_side_s
        self.stats.side_units += 1

    def _fail_remaining(self) -> None:
        with self._cond:
            left = [*self._state.running.values(), *self._state.waiting.clear()]
            scoring, side = list(self._state.scoring), list(self._state.side)
            self._state.scoring.clear()
            self._state.side.clear()
            self._state.partial = None
        error = ShuttingDownError("the server shut down before this request finished: retry")
        self._state.scored.fail_all(self.engine, error)
        for handle in left:
            self._fail(handle, error)
        for job in [*scoring, *side]:
            if not job.future.done():
                job.future.set_exception(error)
        for job in scoring:
            if job.ticket is not None:
                self.fair.settle(job.ticket)

    def _take_work(self, batch: Batch | None) -> Work | None:
        """Waits for work, then takes the arrivals that fit, waiting Classify requests and maybe a side job."""
        state = self._state
        with self._cond:
            while not self._stop and batch is None and not (state.waiting or state.scoring or state.side
                                                            or state.scored or state.partial or state.abandoned):
                self._cond.wait()
            if self._stop:
                return None
            if state.abandoned:  # cancelled while waiting: their parked blocks, if still theirs
                self.engine.release(state.abandoned)
                state.abandoned.clear()
            if batch is None and state.waiting and self.batch_wait_s > 0:
                # Idle server: gather a burst of arrivals into one prefill.
                until = time.monotonic() + self.batch_wait_s
                while len(state.waiting) < self.max_batch_size and (left := until - time.monotonic()) > 0:
                    self._cond.wait(left)
            # A new group of Classify requests once the last one is scored, so none waits behind later ones.
            if not state.scored and state.scoring:
                for job in state.scoring:
                    if job.ticket is not None:
                        self.fair.settle(job.ticket)  # out of the queue; charged as its rows are scored
                state.scored.take(list(state.scoring))
                state.scoring.clear()
            # Classify rows take their blocks first: they give them back within this step.
            if state.scored and not state.scored.claim(self.engine, max_rows=self.max_batch_size,
                                                       max_positions=self.max_prefill_tokens):
                self.stats.kv_waits += 1
            rows = self.max_batch_size if state.row_cap is None else min(state.row_cap, self.max_batch_size)
            taken: list[Request] = []
            if state.partial is None and state.waiting:
                taken, batch = self._joining.take(batch, rows, self.max_prefill_tokens)
            idle = batch is None and not taken and not state.scored and state.partial is None
            if idle:
                # The side job that ran last may have delayed the requests about to arrive: count it
                # against the next busy period, so serving gets its share from the first step.
                state.serve_s, state.side_s = 0.0, state.last_side_s
            side = None
            if state.side and (idle or state.side_s <= self.side_share * (state.serve_s + state.side_s)):
                side = state.side.popleft()
            return Work(taken, side, batch)

    def _charge_scoring(self) -> None:
        """Charges the Classify rows about to be scored to their tasks, at the positions they compute."""
        claimed = self._state.scored.claimed()
        if claimed:
            self.fair.charge((job.ticket, self.engine.fresh_positions(row.prompt, row.key, len(row.tokens)), 0)
                             for job, row in claimed if job.ticket is not None)

    def _step(self, batch: Batch | None, new: list[Request]) -> Batch | None:
        now = time.monotonic()
        new = [h for h in new if self._still_wanted(h, now)]
        if batch is not None:
            batch = self._drop_unwanted(batch, now)
        together = True
        if self.engine.fuses_steps and (new or self._state.partial is not None):
            fused, batch = self._mixed_step(batch, new, now)
            if fused:
                return batch
            together = False  # the rows failed together once: find the one at fault without failing twice
        joining = [*(self._prefill(new, together) if new else []), *self._prefill_chunk(now)]
        if joining:
            parts = [b for b in (batch, *joining) if b is not None]
            batch = self.engine.concatenate(parts)
        if batch is not None:
            batch = self._decode(batch)
        return batch

    def _mixed_step(self, batch: Batch | None, new: list[Request], now: float) -> tuple[bool, Batch | None]:
        """Decodes the batch and prefills the arrivals and the next chunk in one forward (`Engine.step`).

        Returns (True, the batch after it), or (False, the batch) when that forward raised: every row is then as
        it was, and the caller runs the same work apart (`_prefill`, `_prefill_chunk`, `_decode`), which finds
        the row at fault and fails it alone.
        """
        partial = self._wanted_partial(now)
        if batch is not None:
            batch = self._make_room(batch)
            partial = self._state.partial  # making room may have preempted it
        if batch is None and not new and partial is None:
            return True, None
        for h in new:
            self._state.running[h.sequence.request_id] = h
        try:
            merged, events = self.engine.step(batch, [h.sequence for h in new],
                                              None if partial is None else partial[1], self.max_prefill_tokens)
        except Exception as exc:  # noqa: BLE001 - the work is run apart, where a failing row fails alone
            log.warning("a mixed prefill and decode step failed (%r): running its parts apart", exc)
            return False, batch
        if new:
            self.stats.prefills += 1
        if partial is not None:
            self.stats.prefill_chunks += 1
            if partial[1].total == partial[1].done:
                self._state.partial = None
                self.stats.prefills += 1
        if batch is not None:
            self.stats.steps += 1
        if merged is None:
            return True, None
        self.stats.max_batch = max(self.stats.max_batch, len(merged))
        self._dispatch(events)
        return True, self._keep_unfinished(merged)

    def _prefill(self, new: list[Request], together: bool = True) -> list[Batch]:
        """Prefills arriving (or resumed) rows together; if that raises (or, not `together`, from the start),
        each row alone, failing only the rows that fail alone. Returns the batches of the rows that did not
        finish at their first token."""
        for h in new:
            self._state.running[h.sequence.request_id] = h
        done = []
        if together or len(new) == 1:
            try:
                done = [self.engine.prefill([h.sequence for h in new])]
            except Exception as exc:  # noqa: BLE001 - which row failed is found by running each alone
                if len(new) == 1:
                    self._fail_alone(new[0], exc, "prefill")
                    return []
                log.warning("prefill of %d rows failed (%r): running each alone", len(new), exc)
        if not done:
            for h in new:
                try:
                    done.append(self.engine.prefill([h.sequence]))
                except Exception as exc_alone:  # noqa: BLE001 - this row's own failure
                    self._fail_alone(h, exc_alone, "prefill")
        batches = []
        for fresh, events in done:
            self.stats.prefills += 1
            self._dispatch(events)
            if (kept := self._keep_unfinished(fresh)) is not None:
                batches.append(kept)
        return batches

    def _prefill_chunk(self, now: float) -> list[Batch]:
        """Runs the next chunk of the row being prefilled in parts; its batch once the last chunk is in."""
        if (wanted := self._wanted_partial(now)) is None:
            return []
        handle, partial = wanted
        try:
            done = self.engine.prefill_chunk(partial, self.max_prefill_tokens)
        except Exception as exc:  # noqa: BLE001 - the row is alone in its forward
            self._state.partial = None
            self.engine.release([partial.sequence])
            self._fail_alone(handle, exc, "prefill")
            return []
        self.stats.prefill_chunks += 1
        if done is None:
            return []
        self._state.partial = None
        fresh, events = done
        self.stats.prefills += 1
        self._dispatch(events)
        kept = self._keep_unfinished(fresh)
        return [] if kept is None else [kept]

    def _wanted_partial(self, now: float) -> tuple[Request, PartialPrefill] | None:
        """The row being prefilled in chunks, unless its client left or its deadline passed: then dropped."""
        partial = self._state.partial
        if partial is not None and not self._still_wanted(partial[0], now):
            self._state.partial = None
            self.engine.release([partial[1].sequence])  # its partial KV goes with it
            return None
        return partial

    def _make_room(self, batch: Batch) -> Batch | None:
        """Gets every row room for its next token from the KV manager, oldest first; while it says no, the
        newest row gives its blocks back (a row being prefilled in chunks first) and it is asked again."""
        kv, victims = self.engine.kv, []
        fitted: Batch | None = batch
        row = 0
        while fitted is not None and row < len(fitted):
            seq = fitted.sequences[row]
            if kv.allocate_slots(seq.kv, seq.kv.length + 1) is not None:
                row += 1
            elif self._state.partial is not None:
                self._preempt_partial(KvPoolFullError("the KV pool is full"))
            else:
                victims.append(fitted.sequences[-1])
                fitted = self.engine.filter(fitted, list(range(len(fitted) - 1)))
        if victims:
            kept = 0 if fitted is None else len(fitted)
            self._preempt(victims[::-1], KvPoolFullError(f"the KV pool is full ({kept} rows keep decoding)"))
        return fitted

    def _preempt_partial(self, cause: BaseException) -> None:
        """The row being prefilled in chunks gives its blocks back and restarts its prefill later."""
        assert self._state.partial is not None
        sequence = self._state.partial[1].sequence
        self.engine.release([sequence])
        self._preempt([sequence], cause)
        self._state.partial = None

    def _decode(self, batch: Batch) -> Batch | None:
        """One decode step; while it raises, preempts the newest half of the rows and retries with the rest."""
        fitted = self._make_room(batch)
        if fitted is None:
            return None
        batch = fitted
        while True:
            try:
                events = self.engine.decode(batch)
                break
            except Exception as exc:  # noqa: BLE001 - fewer rows may fit; one row alone is the one that fails
                if self._state.partial is not None:
                    # The newest row's partial KV goes first: it restarts its prefill later.
                    self._preempt_partial(exc)
                    continue
                if len(batch) == 1:
                    handle = self._state.running[batch.sequences[0].request_id]
                    self.engine.filter(batch, [])
                    self._fail_alone(handle, exc, "decode")
                    return None
                keep = len(batch) // 2
                self._preempt(batch.sequences[keep:], exc)
                kept = self.engine.filter(batch, list(range(keep)))
                if kept is None:
                    return None
                batch = kept
                self._state.row_cap = keep if self._state.row_cap is None else min(keep, self._state.row_cap)
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        self.stats.steps += 1
        self._dispatch(events)
        return self._keep_unfinished(batch)

    def _preempt(self, rows: list[Sequence], cause: BaseException | None) -> None:
        """Puts rows out of the batch back at the front of their queue, in order. `cause` None: they gave way to
        a more urgent request or a task under its share (routine: logged at DEBUG), parked; else the pool or the
        device ran out of memory and their KV was dropped: they resume by recompute."""
        handles = [self._state.running.pop(s.request_id) for s in rows]
        with self._cond:
            self._state.waiting.push_front(handles)
        for handle in handles:
            self.fair.requeue(handle.ticket)
        if cause is None:
            self.stats.share_preemptions += len(handles)
            log.debug("preempted requests %s (tasks %s) for fair share or priority: parked with their KV",
                      [s.request_id for s in rows], [h.ticket.task for h in handles])
            return
        self.stats.preemptions += len(handles)
        log.warning("preempted %d requests (%r): they resume by recompute; request ids %s",
                    len(handles), cause, [s.request_id for s in rows])

    def _fail_alone(self, handle: Request, error: BaseException, step: str) -> None:
        log.error("%s failed for request %d alone: failing it", step, handle.sequence.request_id,
                  exc_info=error)
        self._fail(handle, error)

    def _still_wanted(self, handle: Request, now: float) -> bool:
        if handle.handle.cancelled.is_set():
            self._fail(handle, CancelledError("the client cancelled the request"))
            return False
        deadline = handle.admitted.deadline
        if deadline is not None and now >= deadline:
            generated = len(handle.sequence.generated)
            self._fail(handle, DeadlineError(
                f"deadline exceeded after {generated} generated tokens: raise the deadline or lower max_new_tokens"
            ))
            return False
        return True

    def _drop_unwanted(self, batch: Batch, now: float) -> Batch | None:
        keep = [i for i, s in enumerate(batch.sequences) if self._still_wanted(self._state.running[s.request_id], now)]
        return self.engine.filter(batch, keep)

    def _keep_unfinished(self, batch: Batch) -> Batch | None:
        return self.engine.filter(batch, [i for i, s in enumerate(batch.sequences) if s.finish_reason is None])

    def _dispatch(self, events: list[TokenEvent]) -> None:
        running = self._state.running
        self.fair.charge((running[event.request_id].ticket, 0, 1) for event in events)
        for event in events:
            handle = running[event.request_id]
            seq = handle.sequence
            usage = None
            if event.finish_reason is not None:
                del running[event.request_id]
                self.fair.settle(handle.ticket, len(seq.generated))
                usage = Usage(len(seq.input_ids), seq.num_virtual_tokens, len(seq.generated))
            handle.handle.put(StreamChunk(event.text, (event.token_id,), handle.admitted.prompt_version,
                                    event.finish_reason, usage))

    def _fail(self, handle: Request, error: BaseException, *, release: bool = True) -> None:
        """Ends the request with `error`; `release`: gives back any blocks it holds (on the worker only)."""
        self._state.running.pop(handle.sequence.request_id, None)
        if release and handle.sequence.kv.blocks:  # a parked row's kept blocks, or a failed prefill's
            self.engine.release([handle.sequence])
        self.fair.settle(handle.ticket, len(handle.sequence.generated))
        handle.handle.put(Failed(error))
