"""Fair share across tasks, per-task limits and priorities: the policy, the order, the limits, preemption.

Ordering and limits are checked deterministically: requests are queued before the worker starts (the
scheduler's public snapshot gives the order they will join in), the state after the first step is read
by a side job queued beforehand (it runs on the worker between two steps), and the worker is held with
a side job while a request arrives. Rate limits run on a fake clock. Outputs are compared with the
no-cache reference: fair share and preemption change when rows run, never what they produce.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
import torch

from helpers import TEXTS, reference_greedy, running_server, wait_until
from softprompt.client import Client, PermissionDeniedError, ResourceExhaustedError
from softprompt.client.cli import main
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.options import DecodingOptions
from softprompt.server.access.callers import ANONYMOUS, Principal
from softprompt.server.access.tokens import Role, TokenEntry, format_entry, hash_token
from softprompt.server.app.server import build_app
from softprompt.server.config import ServerConfig
from softprompt.server.core.admission import Admitted
from softprompt.server.core.engine import Engine, Sequence
from softprompt.server.core.errors import CancelledError, OverloadedError, PriorityNotAllowedError, TaskLimitError
from softprompt.server.core.fairness import FairQueue, FairShare, FairShareKey, Ticket
from softprompt.server.core.pool import BLOCK_SIZE, KvPool, blocks_for
from softprompt.server.core.policy import PolicyError, PolicyFile, TaskPolicy, load_policy, parse_policy
from softprompt.server.service import statuses

POLICY_TOML = """
[default]
weight = 1

[[tasks]]
match = ["batch-*", "etl"]
weight = 1
max_running = 2
max_queued = 3
tokens_per_second = 10
burst = 100
priority = 5

[[tasks]]
match = "chat"
weight = 3
priority = -1

[priorities]
infer = 0
admin = -10
"""

POLICY_YAML = """
default: {weight: 2}
tasks:
  - match: [batch-*, etl]
    max_running: 2
    priority: 5
priorities: {infer: 1}
"""


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _policy_file(tmp_path: Path, text: str, name: str = "policy.toml", clock: Clock | None = None) -> PolicyFile:
    path = tmp_path / name
    path.write_text(text)
    return PolicyFile(path, clock=clock or Clock())


# ---------------------------------------------------------------- the policy file


def test_policy_toml_first_matching_rule_wins_else_the_default(tmp_path):
    table = _policy_file(tmp_path, POLICY_TOML).current()
    batch = table.for_task("batch-nightly")
    assert (batch.max_running, batch.max_queued, batch.tokens_per_second, batch.bucket_size, batch.priority) == \
        (2, 3, 10, 100, 5)
    assert table.for_task("etl") is batch
    assert table.for_task("chat").weight == 3 and table.for_task("chat").priority == -1
    assert table.for_task("other") == TaskPolicy()
    assert table.for_task("-") == TaskPolicy()  # the bare model: the default unless a rule names `-`
    assert table.priority_floor(Role.INFER) == 0 and table.priority_floor(Role.ADMIN) == -10
    assert table.priority_floor(None) == -10  # no tokens: what an admin may


def test_policy_yaml_reads_the_same_and_defaults_fill_in(tmp_path):
    table = _policy_file(tmp_path, POLICY_YAML, "policy.yaml").current()
    assert table.for_task("etl").max_running == 2 and table.for_task("etl").weight == 1
    assert table.for_task("x").weight == 2
    assert table.priority_floor(Role.INFER) == 1 and table.priority_floor(Role.ADMIN) is None
    assert TaskPolicy(tokens_per_second=50).bucket_size == 50  # burst: one second's worth unless given


@pytest.mark.parametrize(("data", "message"), [
    ({"tasks": [{"match": "a", "wieght": 2}]}, r"tasks entry 1 \(a\): unknown key\(s\) \['wieght'\]"),
    ({"tasks": [{"weight": 2}]}, "tasks entry 1: each entry needs `match`"),
    ({"tasks": [{"match": "a", "weight": 0}]}, "weight must be a number > 0"),
    ({"tasks": [{"match": "a", "max_running": 1.5}]}, "max_running must be a whole number >= 1"),
    ({"tasks": [{"match": "a", "burst": 10}]}, "burst needs tokens_per_second"),
    ({"default": {"priority": "high"}}, r"\[default\]: priority must be a number"),
    ({"priorities": {"root": 0}}, "unknown role 'root'"),
    ({"limits": {}}, r"unknown section\(s\) \['limits'\]"),
])
def test_policy_errors_name_the_place_and_the_fix(data, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(data, "policy.toml")


def test_policy_file_is_reread_when_it_changes_and_a_bad_edit_keeps_the_old_one(tmp_path):
    clock = Clock()
    policy = _policy_file(tmp_path, POLICY_TOML, clock=clock)
    assert policy.current().for_task("chat").weight == 3
    policy.path.write_text(POLICY_TOML.replace("weight = 3", "weight = 7") + "\n")  # another size: a change
    assert policy.current().for_task("chat").weight == 3  # checked at most once a second
    clock.now += 1.0
    assert policy.current().for_task("chat").weight == 7
    policy.path.write_text("[[tasks]]\nmatch = 'chat'\nweight = -1\n")
    clock.now += 1.0
    assert policy.current().for_task("chat").weight == 7  # kept: the edit does not parse
    assert policy.reload() is False  # SIGHUP's path says so too
    (tmp_path / "policy.txt").write_text(POLICY_TOML)
    with pytest.raises(PolicyError, match="name the file .toml, .yaml or .yml"):
        load_policy(tmp_path / "policy.txt")


# ---------------------------------------------------------------- order, lift, limits (no model)


class _Item:
    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket


def _queue() -> FairQueue[_Item]:
    return FairQueue(lambda item: item.ticket)


def _enter(share: FairShare, task: str, *, principal: Principal = Principal(), priority: int | None = None,
           tokens: int = 10, max_new: int = 10) -> _Item:
    return _Item(share.enter(task, principal, priority=priority, input_tokens=tokens, max_new=max_new))


def _tasks(items) -> list[str]:
    return [i.ticket.task for i in items]


def test_weights_interleave_one_plan_one_to_three(tmp_path):
    share = FairShare(_policy_file(tmp_path, '[[tasks]]\nmatch = "b"\nweight = 3\n'))
    queue = _queue()
    for _ in range(8):
        queue.push(_enter(share, "a"))
    for _ in range(12):
        queue.push(_enter(share, "b"))
    assert _tasks(queue.ordered(share, []))[:8] == ["a", "b", "b", "b", "a", "b", "b", "b"]


def test_the_least_served_task_goes_first_and_a_task_back_from_idle_banks_no_credit():
    share = FairShare()
    a = [_enter(share, "a") for _ in range(3)]
    share.charge([(a[0].ticket, 100, 50)])  # a has been served
    queue = _queue()
    for item in a:
        queue.push(item)
    b = _enter(share, "b")
    queue.push(b)
    # b comes from idle: lifted to a's counter (no credit), and wins the tie holding fewer rows.
    assert share.counters()["b"] == share.counters()["a"]
    assert _tasks(queue.ordered(share, [a[0].ticket]))[:2] == ["b", "a"]
    # b served far more, then idle: back, it is not lowered either; a goes first.
    share.charge([(b.ticket, 1000, 0)])
    share.start(b.ticket)
    share.settle(b.ticket)
    queue.remove(b)
    queue.push(_enter(share, "b"))
    assert _tasks(queue.ordered(share, []))[0] == "a"


def test_priority_first_then_fair_share_and_arrival_order_without_it():
    share = FairShare()
    queue = _queue()
    for task, priority in [("a", None), ("a", None), ("b", 3), ("c", -2), ("a", -2)]:
        queue.push(_enter(share, task, priority=priority))
    order = list(queue.ordered(share, []))
    assert [(i.ticket.task, i.ticket.priority) for i in order] == [("c", -2), ("a", -2), ("a", 0), ("a", 0), ("b", 3)]
    off = FairShare(key=FairShareKey.OFF)
    queue = _queue()
    for task in "aabab":
        queue.push(_enter(off, task))
    assert _tasks(queue.ordered(off, [])) == list("aabab")  # plain arrival order


def test_the_token_key_shares_between_callers_not_tasks():
    share = FairShare(key=FairShareKey.TOKEN)
    alice, bob = Principal("token:aaaa", Role.INFER), Principal("token:bbbb", Role.INFER)
    queue = _queue()
    for principal in (alice, alice, alice, bob):
        queue.push(_enter(share, "same-task", principal=principal))
    assert [i.ticket.key for i in queue.ordered(share, [])] == ["token:aaaa", "token:bbbb", "token:aaaa", "token:aaaa"]
    assert Principal.of(None).identity == ANONYMOUS
    entry = TokenEntry(hash_token("secret-token"), Role.INFER)
    assert Principal.of(entry).identity == "token:" + entry.token_hash[7:19]  # the hash's, never the token


def test_a_task_at_its_running_cap_is_passed_over_not_blocking_others(tmp_path):
    share = FairShare(_policy_file(tmp_path, POLICY_TOML))
    queue = _queue()
    running = [_enter(share, "etl").ticket]
    share.start(running[0])
    for task in ["etl", "etl", "etl", "other"]:
        queue.push(_enter(share, task))
    # etl holds 1 row of its 2: one more may join (after `other`, which holds none); the rest wait.
    assert _tasks(queue.ordered(share, running)) == ["other", "etl"]


def test_a_running_cap_holds_across_keys_when_the_key_is_not_the_task(tmp_path):
    """With --fair-share token a task's requests come from several callers' keys: its cap (etl: 2 rows) counts
    every key's picks (bob's pick fills it before alice's second)."""
    share = FairShare(_policy_file(tmp_path, POLICY_TOML), key=FairShareKey.TOKEN)
    alice, bob = Principal("token:aaaa", Role.INFER), Principal("token:bbbb", Role.INFER)
    queue = _queue()
    for task, principal in [("etl", alice), ("etl", alice), ("other", alice), ("etl", bob)]:
        queue.push(_enter(share, task, principal=principal))
    order = [(i.ticket.task, i.ticket.key[-4:]) for i in queue.ordered(share, [])]
    # other first (etl's default priority is 5); alice's second etl request finds etl at its cap.
    assert order == [("other", "aaaa"), ("etl", "aaaa"), ("etl", "bbbb")]


def test_queued_cap_refuses_with_the_task_and_the_limit(tmp_path, caplog):
    share = FairShare(_policy_file(tmp_path, POLICY_TOML))
    items = [_enter(share, "etl", tokens=1, max_new=1) for _ in range(3)]
    with pytest.raises(TaskLimitError, match=r"task 'etl' has 3 requests queued, its limit \(max_queued 3") as e:
        _enter(share, "etl", tokens=1, max_new=1)
    assert (e.value.task, e.value.limit) == ("etl", "max_queued")
    assert isinstance(e.value, OverloadedError) and statuses.status_for(e.value).http == 429
    assert "refused a request for task etl: over its max_queued limit" in caplog.text
    _enter(share, "other")  # other tasks are not limited by it
    share.start(items[0].ticket)  # one leaves the queue: room for another
    _enter(share, "etl", tokens=1, max_new=1)


def test_token_rate_limit_takes_input_and_max_new_tokens_refunds_the_unused_and_says_when_to_retry(tmp_path):
    clock = Clock()
    share = FairShare(_policy_file(tmp_path, POLICY_TOML, clock=clock), clock=clock)  # etl: 10 tokens/s, burst 100
    first = _enter(share, "etl", tokens=20, max_new=40)  # 60 of 100
    with pytest.raises(TaskLimitError, match=r"over its token rate \(10 tokens/s, burst 100") as e:
        _enter(share, "etl", tokens=20, max_new=40)  # 60 > 40 left
    assert e.value.limit == "tokens_per_second" and e.value.retry_after_s == pytest.approx(2.0)
    assert statuses.retry_after(e.value) == 2
    clock.now += 2.0  # 40 + 20 refilled
    second = _enter(share, "etl", tokens=20, max_new=40)
    share.start(first.ticket)
    share.settle(first.ticket, generated=10)  # 30 of its 40 new tokens unused: back in the bucket
    third = _enter(share, "etl", tokens=10, max_new=20)  # 30 of the 30 refunded
    assert third.ticket.reserved == 30 and second.ticket.state.value == "queued"
    loads = {t.task: t for t in share.loads([])}
    assert loads["etl"].refused == 1 and loads["etl"].queued == 2


def test_priority_is_bounded_by_the_callers_role(tmp_path):
    share = FairShare(_policy_file(tmp_path, POLICY_TOML))  # infer down to 0, admin to -10; chat's default -1
    infer, admin = Principal("token:i", Role.INFER), Principal("token:a", Role.ADMIN)
    with pytest.raises(PriorityNotAllowedError, match=r"priority -1 is more urgent than a token with the infer "
                                                      r"role may ask for \(at most 0"):
        _enter(share, "other", principal=infer, priority=-1)
    assert _enter(share, "other", principal=infer, priority=7).ticket.priority == 7  # less urgent: always allowed
    assert _enter(share, "chat", principal=infer, priority=-1).ticket.priority == -1  # the task's own default
    assert _enter(share, "chat", principal=infer).ticket.priority == -1  # left out: the default
    assert _enter(share, "other", principal=admin, priority=-10).ticket.priority == -10
    with pytest.raises(PriorityNotAllowedError):
        _enter(share, "other", principal=admin, priority=-11)
    assert statuses.status_for(PriorityNotAllowedError("x")).grpc == "PERMISSION_DENIED"
    assert _enter(FairShare(), "x", priority=-1000).ticket.priority == -1000  # no file: admin is unbounded


def test_victims_less_urgent_rows_first_then_the_most_served_task_over_its_share():
    share = FairShare()
    a = [share.enter("a", Principal(), priority=None, input_tokens=1, max_new=1) for _ in range(4)]
    b = share.enter("b", Principal(), priority=None, input_tokens=1, max_new=1)
    share.charge([(a[0], 100, 100)])
    # b holds 0 rows of its 2 (4 rows, 2 busy tasks); a holds 4: its newest row gives way.
    assert share.victim(b, a, rows=4, waiting_keys=["b"]) == 3
    # Once b holds its share, nobody gives way to either: rows never swap back and forth.
    rows = [a[0], a[1], b, share.enter("b", Principal(), priority=None, input_tokens=1, max_new=1)]
    assert share.victim(a[2], rows, rows=4, waiting_keys=["a"]) is None
    assert share.victim(b, rows, rows=4, waiting_keys=["b"]) is None
    urgent = share.enter("a", Principal(), priority=-1, input_tokens=1, max_new=1)
    lazy = share.enter("c", Principal(), priority=2, input_tokens=1, max_new=1)
    assert share.victim(urgent, [a[0], lazy, a[1]], rows=3, waiting_keys=["a"]) == 1  # even of its own task
    assert FairShare(preempt=False).victim(urgent, [lazy], rows=1, waiting_keys=[]) is None


def test_a_request_under_its_share_waits_for_a_row_that_ends_soon_instead_of_preempting():
    """With --fair-preemption-wait 0.25 a preemption (a recompute for the row) happens only when no row ends
    within a quarter of the waiting request's own max_new_tokens (a more urgent request does not wait)."""
    share = FairShare(wait=0.25)
    flood = [share.enter("a", Principal(), priority=None, input_tokens=1, max_new=64) for _ in range(4)]
    b = share.enter("b", Principal(), priority=None, input_tokens=1, max_new=16)
    assert share.victim(b, flood, rows=4, waiting_keys=["b"], frees_in=5) == 3  # 16 // 4 = 4 steps: too long
    assert share.victim(b, flood, rows=4, waiting_keys=["b"], frees_in=4) is None
    urgent = share.enter("b", Principal(), priority=-1, input_tokens=1, max_new=16)
    assert share.victim(urgent, flood, rows=4, waiting_keys=["b"], frees_in=1) == 3
    assert FairShare().victim(b, flood, rows=4, waiting_keys=["b"], frees_in=1) == 3  # by default: never waits
    assert FairShare(wait=0.5).victim(b, flood, rows=4, waiting_keys=["b"], frees_in=8) is None
    assert ServerConfig(store=Path("s"), fair_preemption_wait=0.5).fair_preemption_wait == 0.5
    with pytest.raises(ValueError, match=r"fair_preemption_wait must be within \[0, 1\]"):
        ServerConfig(store=Path("s"), fair_preemption_wait=2)


# ---------------------------------------------------------------- the scheduler


def _app(base, tmp_path, *, policy: str | None = None, batch: int = 2, **settings):
    path = None
    if policy is not None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        path = tmp_path / "policy.toml"
        path.write_text(policy)
    config = ServerConfig(port=0, store=tmp_path / "store", max_batch_size=batch, max_queued_requests=64,
                          task_policy=path, http_port=None, **settings)
    app = build_app(config, base=base)
    app.scheduler.engine.ignore_eos = True  # every row makes all its tokens: rows run as long as asked
    return app


def _prompts(base) -> dict[str, torch.Tensor]:
    hidden, scale = base.spec.hidden_size, base.model.get_input_embeddings().weight.std()
    g = torch.Generator().manual_seed(3)
    return {task: torch.randn(3, hidden, generator=g) * scale * 4 for task in ("a", "b", "c")}


class _Submitter:
    """Queues generations for tasks straight on the scheduler (each task's prompt as its soft prompt)."""

    def __init__(self, app, prompts: dict[str, torch.Tensor]) -> None:
        self.app, self.prompts, self.ids = app, prompts, iter(range(1, 10_000))
        self.sent: list[tuple[str, str, int, object]] = []
        self.results: dict[int, object] = {}

    def __call__(self, task: str, n: int = 6, *, priority: int | None = None, text: int = 0):
        base = self.app.base
        ids = base.tokenizer(TEXTS[text % len(TEXTS)]).input_ids
        seq = Sequence(request_id=next(self.ids), input_ids=ids, params=DecodingOptions(max_new_tokens=n),
                       prompt=self.prompts[task].to(base.dtype))
        self.app.scheduler.engine.start(seq)
        handle = self.app.scheduler.submit(Admitted(seq, f"{task}@1", None, priority=priority))
        self.sent.append((task, TEXTS[text % len(TEXTS)], n, handle))
        return handle

    def result(self, handle):
        """The request's whole generation (a handle's chunks can be read once: kept for `check_outputs`)."""
        if handle.request_id not in self.results:
            self.results[handle.request_id] = handle.result()
        return self.results[handle.request_id]

    def check_outputs(self) -> None:
        """Every request made exactly the reference's tokens, whenever and however often it ran."""
        base = self.app.base
        for task, text, n, handle in self.sent:
            expected = reference_greedy(base.model, self.prompts[task], base.tokenizer(text).input_ids, n, eos_ids=())
            assert list(self.result(handle).token_ids) == expected, (task, handle.request_id)


def _after_first_step(app):
    """The scheduler's snapshot taken on the worker right after its first step (a side job queued now)."""
    seen = []
    thread = threading.Thread(target=lambda: seen.append(app.scheduler.call(app.scheduler.snapshot)), daemon=True)
    thread.start()
    wait_until(lambda: app.scheduler.snapshot().side_jobs == 1, "the side job to be queued")
    return thread, seen


def test_a_backlogged_task_cannot_keep_a_task_with_fewer_requests_out(tiny_base, tmp_path):
    app = _app(tiny_base, tmp_path)
    submit = _Submitter(app, _prompts(tiny_base))
    flood = [submit("a", text=i) for i in range(6)]
    late = [submit("b", text=i) for i in range(2)]
    ids = [h.request_id for h in flood], [h.request_id for h in late]
    assert app.scheduler.snapshot().waiting == (ids[0][0], ids[1][0], ids[0][1], ids[1][1], *ids[0][2:])
    thread, seen = _after_first_step(app)
    app.scheduler.start()
    thread.join(timeout=120)
    assert sorted(r.request_id for r in seen[0].running) == [ids[0][0], ids[1][0]]  # one row each
    submit.check_outputs()
    app.scheduler.close()


def test_off_keeps_arrival_order_and_weights_divide_the_first_batch(tiny_base, tmp_path):
    off = _app(tiny_base, tmp_path / "off", fair_share="off")
    submit = _Submitter(off, _prompts(tiny_base))
    handles = [submit(task) for task in "aaab"]
    assert off.scheduler.snapshot().waiting == tuple(h.request_id for h in handles)

    weighted = _app(tiny_base, tmp_path / "weighted", batch=4, policy='[[tasks]]\nmatch = "b"\nweight = 3\n')
    submit = _Submitter(weighted, _prompts(tiny_base))
    for task in "aaaaabbbbb":
        submit(task)
    thread, seen = _after_first_step(weighted)
    weighted.scheduler.start()
    thread.join(timeout=120)
    assert sorted(t.task for t in seen[0].tasks if t.running for _ in range(t.running)) == ["a", "b", "b", "b"]
    submit.check_outputs()
    weighted.scheduler.close()


def test_a_task_over_its_share_gives_its_newest_row_to_a_waiting_task_and_it_resumes_exactly(tiny_base, tmp_path):
    app = _app(tiny_base, tmp_path)
    submit = _Submitter(app, _prompts(tiny_base))
    flood = [submit("a", n=24, text=i) for i in range(4)]
    app.scheduler.start()
    wait_until(lambda: any(r.generated >= 2 for r in app.scheduler.snapshot().running), "a's rows to decode")
    release = threading.Event()
    holder = threading.Thread(target=app.scheduler.call, args=(release.wait,), daemon=True)  # holds the worker
    holder.start()
    wait_until(lambda: not app.scheduler.snapshot().side_jobs, "the worker to be held")
    newest = max(r.request_id for r in app.scheduler.snapshot().running)
    late = submit("b", n=4)
    assert app.scheduler.snapshot().waiting[0] == late.request_id  # first in fair order, but no row is free
    release.set()
    submit.result(late)
    assert app.scheduler.stats.share_preemptions == 1  # a's newest row, and only it, gave way
    assert newest in {h.request_id for h in flood}
    submit.check_outputs()  # the preempted row resumed with the same tokens
    assert app.scheduler.stats.preemptions == 0  # the KV pool never ran short
    assert app.scheduler.stats.resumed_parked == 1  # so the row kept its KV and rejoined without recomputing
    app.scheduler.close()


def test_a_burst_under_its_share_joins_a_full_batch_in_one_step(tiny_base, tmp_path):
    app = _app(tiny_base, tmp_path, batch=4)
    submit = _Submitter(app, _prompts(tiny_base))
    for i in range(6):
        submit("a", n=24, text=i)
    app.scheduler.start()
    wait_until(lambda: len(app.scheduler.snapshot().running) == 4, "a's rows to fill the batch")
    release = threading.Event()
    threading.Thread(target=app.scheduler.call, args=(release.wait,), daemon=True).start()
    wait_until(lambda: not app.scheduler.snapshot().side_jobs, "the worker to be held")
    late = [submit("b", n=4, text=0), submit("c", n=4, text=1)]
    release.set()
    for handle in late:
        submit.result(handle)
    # Each made a row of a's give way, in the same step: they joined together, not one a step.
    assert late[0].started_at == late[1].started_at is not None
    submit.check_outputs()  # (every request finished, a's two parked rows too)
    assert app.scheduler.stats.share_preemptions == 2 == app.scheduler.stats.resumed_parked
    app.scheduler.close()


def test_a_parked_row_cancelled_while_it_waits_frees_its_queue_slot_at_once_and_its_blocks_next_step(tiny_base,
                                                                                                      tmp_path):
    app = _app(tiny_base, tmp_path, batch=2)
    submit = _Submitter(app, _prompts(tiny_base))
    flood = [submit("a", n=24, text=i) for i in range(2)]
    app.scheduler.start()
    wait_until(lambda: any(r.generated >= 2 for r in app.scheduler.snapshot().running), "a's rows to decode")
    newest = next(h for h in flood if h.request_id == max(r.request_id for r in app.scheduler.snapshot().running))
    late = submit("b", n=24, text=2)
    wait_until(lambda: app.scheduler.snapshot().waiting == (newest.request_id,), "a's newest row to give way")
    assert app.scheduler.engine.kv.parked_rows == 1
    newest.cancel()
    assert app.scheduler.queue_depth() == 0  # its queue slot is free at once, although its blocks are parked
    with pytest.raises(CancelledError):
        newest.result()
    wait_until(lambda: app.scheduler.engine.kv.parked_rows == 0, "the worker to take its blocks back")
    for handle in (flood[0], late):
        submit.result(handle)
    assert app.scheduler.engine.kv_usage().used_blocks == 0  # nothing leaked
    app.scheduler.close()


def test_a_parked_row_whose_blocks_the_pool_needs_resumes_by_recompute_with_the_same_tokens(tiny_base, tmp_path):
    """The pool is sized so that b joins only with the blocks a's newest row kept when it gave way."""
    tokens = [len(tiny_base.tokenizer(TEXTS[i]).input_ids) + 3 + 1 for i in (0, 2)]  # prefill + first step
    older, b_needs = blocks_for(tokens[0]), blocks_for(tokens[1])
    blocks = older + b_needs + 1  # + the block b leaves in reserve for a's older row; the newest's are short
    per_block = KvPool.bytes_per_token(Engine(tiny_base).pool.layers, tiny_base.dtype) * BLOCK_SIZE
    app = _app(tiny_base, tmp_path, kv_cache_memory=str(per_block * (blocks + 1)))
    assert app.scheduler.engine.kv_usage().total_blocks == blocks
    submit = _Submitter(app, _prompts(tiny_base))
    for i in range(2):
        submit("a", n=24, text=i)
    release = threading.Event()
    threading.Thread(target=app.scheduler.call, args=(release.wait,), daemon=True).start()
    wait_until(lambda: app.scheduler.snapshot().side_jobs == 1, "the side job to be queued")
    app.scheduler.start()  # the side job runs after the first step (a's rows made a token each) and holds the worker
    wait_until(lambda: not app.scheduler.snapshot().side_jobs, "the worker to be held")
    late = submit("b", n=4, text=2)
    release.set()
    submit.result(late)
    submit.check_outputs()
    stats = app.scheduler.stats
    assert stats.share_preemptions >= 1 and stats.resumed_parked == 0  # gave way parked, then recomputed
    assert app.scheduler.engine.kv_usage().used_blocks == 0
    app.scheduler.close()


def test_a_more_urgent_request_preempts_a_less_urgent_row_and_no_share_rule_without_preemption(tiny_base, tmp_path):
    for preempt in (True, False):
        app = _app(tiny_base, tmp_path / str(preempt), fair_preemption=preempt)
        submit = _Submitter(app, _prompts(tiny_base))
        submit("a", n=24)
        submit("a", n=24, priority=3)
        app.scheduler.start()
        wait_until(lambda: len(app.scheduler.snapshot().running) == 2, "both rows to run")
        release = threading.Event()
        holder = threading.Thread(target=app.scheduler.call, args=(release.wait,), daemon=True)
        holder.start()
        wait_until(lambda: not app.scheduler.snapshot().side_jobs, "the worker to be held")
        urgent = submit("a", n=3, priority=-1)
        release.set()
        submit.result(urgent)
        assert app.scheduler.stats.share_preemptions == (1 if preempt else 0)
        submit.check_outputs()
        app.scheduler.close()


def test_running_cap_holds_a_task_back_while_the_others_go_ahead(tiny_base, tmp_path):
    app = _app(tiny_base, tmp_path, batch=4, policy='[[tasks]]\nmatch = "a"\nmax_running = 1\n')
    submit = _Submitter(app, _prompts(tiny_base))
    handles = [submit(task) for task in "aaab"]
    # The capped task's second and third requests wait behind b although they arrived first.
    assert app.scheduler.snapshot().waiting == tuple(h.request_id for h in [handles[0], handles[3], *handles[1:3]])
    thread, seen = _after_first_step(app)
    app.scheduler.start()
    thread.join(timeout=120)
    loads = {t.task: t for t in seen[0].tasks}
    assert (loads["a"].running, loads["a"].queued, loads["b"].running) == (1, 2, 1)
    submit.check_outputs()
    app.scheduler.close()


def test_limits_refuse_at_submit_and_the_view_counts_them(tiny_base, tmp_path):
    app = _app(tiny_base, tmp_path, policy='[[tasks]]\nmatch = "a"\nmax_queued = 2\n')
    submit = _Submitter(app, _prompts(tiny_base))
    submit("a")
    submit("a")
    with pytest.raises(TaskLimitError, match="max_queued 2"):
        submit("a")
    submit("b")  # another task is not limited by a's cap
    snapshot = app.scheduler.snapshot()
    loads = {t.task: t for t in snapshot.tasks}
    assert (loads["a"].queued, loads["a"].refused, loads["b"].queued) == (2, 1, 1)
    assert len(snapshot.waiting) == 3
    app.scheduler.start()
    submit.check_outputs()
    served = {t.task: t for t in app.scheduler.task_loads(everything=True)}
    assert served["a"].output_tokens == 12 and served["b"].output_tokens == 6
    assert served["a"].input_tokens > 0
    app.scheduler.close()


# ---------------------------------------------------------------- over the wire


def test_limits_and_priority_bounds_answer_with_precise_statuses_over_grpc_and_http(tiny_base, tmp_path, capsys):
    """A task over its token rate gets RESOURCE_EXHAUSTED / 429 with a retry delay naming the task and the
    limit, while its requests within the limit and other tasks' requests succeed; a priority more urgent
    than the token's role may ask for is PERMISSION_DENIED / 403, the admin's is served."""
    policy = tmp_path / "policy.toml"
    # A bucket of 100 tokens that refills a token every 100 s: a request takes input + max_new_tokens.
    policy.write_text('[[tasks]]\nmatch = "etl*"\ntokens_per_second = 0.01\nburst = 100\n\n[priorities]\ninfer = 0\n')
    tokens = tmp_path / "tokens"
    tokens.write_text("\n".join([format_entry(hash_token("user"), Role.INFER),
                                 format_entry(hash_token("root"), Role.ADMIN)]) + "\n")
    with running_server(tiny_base, tmp_path / "store", http_port=0, metrics_port=0, auth_tokens=tokens,
                        task_policy=policy) as (app, address):
        app.scheduler.engine.ignore_eos = True  # every request makes all it asked for: no tokens come back
        prompts = _prompts(tiny_base)
        for task in ("etl", "etl-http", "chat"):
            app.registry.register(task, PromptTensor(embeddings=prompts["a"], source_type="RAW"), tiny_base.spec)
        text = "hello"
        size = len(tiny_base.tokenizer(text).input_ids)
        assert size + 30 <= 50  # two requests of 30 new tokens fit in the bucket, a third does not
        with Client(address, token="user") as user, Client(address, token="root") as root:
            for _ in range(2):
                assert len(user.generate("etl", text, max_new_tokens=30).token_ids) == 30
            with pytest.raises(ResourceExhaustedError, match=r"task 'etl' is over its token rate \(0.01 tokens/s, "
                               r"burst 100; --task-policy\)") as refused:
                user.generate("etl", text, max_new_tokens=30)
            assert refused.value.retry_after is not None and refused.value.retry_after >= 1
            assert user.generate("chat", text, max_new_tokens=30).token_ids  # other tasks are not held back

            with pytest.raises(PermissionDeniedError, match=r"priority -1 is more urgent than a token with the "
                               r"infer role may ask for \(at most 0"):
                user.generate("chat", text, max_new_tokens=2, priority=-1)
            assert user.generate("chat", text, max_new_tokens=2, priority=4).token_ids  # less urgent: allowed
            assert root.generate("chat", text, max_new_tokens=2, priority=-5).token_ids

        url = f"http://127.0.0.1:{app.http_port}/v1/completions"
        user_h, root_h = ({"Authorization": f"Bearer {t}"} for t in ("user", "root"))
        body = {"model": "etl-http", "prompt": text, "max_tokens": 30, "temperature": 0}
        for _ in range(2):
            assert httpx.post(url, json=body, headers=user_h, timeout=60).status_code == 200
        response = httpx.post(url, json=body, headers=user_h, timeout=60)
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        error = response.json()["error"]
        assert error["type"] == "rate_limit_error" and "task 'etl-http' is over its token rate" in error["message"]
        urgent = {**body, "model": "chat", "max_tokens": 2, "priority": -1}
        response = httpx.post(url, json=urgent, headers=user_h, timeout=60)
        assert response.status_code == 403 and "priority -1 is more urgent" in response.json()["error"]["message"]
        assert httpx.post(url, json=urgent, headers=root_h, timeout=60).status_code == 200
        loads = {t.task: t for t in app.scheduler.task_loads(everything=True)}
        assert (loads["etl"].refused, loads["etl-http"].refused, loads["chat"].refused) == (1, 1, 0)
        metrics = _scrape(app.metrics_port)
        assert metrics[("softprompt_task_refused_total", (("task", "etl"),))] == 1
        assert metrics[("softprompt_task_served_tokens_total", (("kind", "output"), ("task", "etl")))] == 60
        assert metrics[("softprompt_task_queue_wait_seconds_count", (("task", "chat"),))] == 4  # refused: not queued
        assert ("softprompt_task_fair_share", (("task", "chat"),)) in metrics
        assert main(["--server", address, "--token", "root", "--json", "top", "--count", "1"]) == 0
        shown = {t["task"]: t for t in json.loads(capsys.readouterr().out)["tasks"]}
        assert (shown["etl"]["refused"], shown["chat"]["refused"], shown["chat"]["weight"]) == (1, 0, 1.0)
        assert main(["--server", address, "--token", "root", "top", "--count", "1"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[1].split() == ["TASK", "RUNNING", "QUEUED", "SHARE", "FAIR", "SHARE", "WEIGHT", "PRIORITY",
                                    "TOKENS/S", "REFUSED"]
        assert {line.split()[0] for line in table[2:]} == {"etl", "etl-http", "chat"}


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample /metrics serves, by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_fair_share_benchmark_runs_every_scenario(tiny_model_dir, tmp_path, capsys):
    """The benchmark's scenarios end to end at a small size (its figures are the lead's to measure): every
    request served, the rate limit refuses with a retry delay, and every figure is reported."""
    from softprompt.benchmarks.fair_share import main as fair_main

    out = tmp_path / "fair.json"
    argv = ["--model", str(tiny_model_dir), "--batch", "2", "--flood", "6", "--flood-new", "4", "--b-new", "2",
            "--b-requests", "2", "--gap", "0.2", "--seconds", "2", "--many-seconds", "2", "--tasks", "3", "--rate", "40",
            "--threads", "1", "--json-out", str(out)]
    code = fair_main(argv)
    figures = json.loads(out.read_text())
    assert code == 0, figures
    assert set(figures["flood"]) == {"reference", "off", "fair", "fair-nopreempt"}
    assert all(figures["flood"][m]["b_latency_x"] > 0 for m in ("off", "fair", "fair-nopreempt")), figures["flood"]
    assert figures["weights"]["service_ratio"] > 0 and figures["many"]["p99_ratio_max"] > 0, figures
    forwards = figures["many"]["forwards"]  # (JSON keys: without, with the flood)
    assert all(f["ms"] > 0 and f["rows"] > 0 and f["prefill"] > 0 for f in forwards.values()), forwards
    rate = figures["rate"]
    assert rate["within_failed"] == 0 and rate["over_refused"] >= 1 and rate["retry_after_given"], rate
    assert rate["over_refused"] < rate["over_sent"]  # the bucket's worth went through
    assert "task 'limited' is over its token rate" in rate["message"]
    assert "per-task p99 with / without the flood" in capsys.readouterr().out


def test_classify_and_chunked_prefill_are_charged_what_they_compute(tiny_base, tmp_path):
    """Service counts every position computed: a Classify request's scored rows (no generated tokens), and a
    prefill done in chunks as its whole fresh positions (the soft prompt's, uncached the first time, and the
    input's)."""
    with running_server(tiny_base, tmp_path / "store", max_prefill_tokens=8) as (app, address):
        app.scheduler.engine.ignore_eos = True
        prompts = _prompts(tiny_base)
        for task in ("scored", "chunked"):
            app.registry.register(task, PromptTensor(embeddings=prompts["a"], source_type="RAW"), tiny_base.spec)
        text = TEXTS[0]
        ids = tiny_base.tokenizer(text).input_ids
        assert len(ids) + 3 > 8  # more than one chunk
        with Client(address) as client:
            assert len(client.classify("scored", text, ["yes", "no"]).scores) == 2
            assert len(client.generate("chunked", text, max_new_tokens=2).token_ids) == 2
        loads = {t.task: t for t in app.scheduler.task_loads(everything=True)}
        assert loads["scored"].input_tokens >= 2 * len(ids) and loads["scored"].output_tokens == 0
        assert (loads["chunked"].input_tokens, loads["chunked"].output_tokens) == (3 + len(ids), 2)
        assert app.scheduler.stats.prefill_chunks >= 2
        counters = app.scheduler.fair.counters()
        assert counters["chunked"] == 3 + len(ids) + 2 * 2  # input x1, output x2, weight 1
        assert counters["scored"] == loads["scored"].input_tokens
