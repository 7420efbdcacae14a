"""`python -m softprompt.benchmarks.memory`: rows held at once in the same KV memory, paged pool against the old arena.

One trace of `--requests` requests, all queued at once (seeded): inputs uniform in 16-1,024 tokens,
`max_new_tokens` uniform in 16-512, a 20-token soft prompt on one of 8 tasks per request (round-robin;
`--virtual-tokens 0` for none). Both sides get the same KV memory M, printed in tokens and bytes:
the memory of a pool holding `--kv-tokens` tokens (16,384 by default) plus its reserved block.

  pool   measured: the real Scheduler and Engine (no gRPC) with `kv_cache_bytes=M` and 256 rows
         allowed, every row greedy with `ignore_eos`, so lengths are exactly as planned. Each decode
         step records its rows and the pool's used blocks; the scheduler counts preemptions.
  arena  simulated: the KV arena the pool replaced was deleted with it (commit b040546), so its
         admission is replayed on the same trace. The arena reserved, for the rows of a batch,
         `power_of_two(rows) x round_up(t + max_remaining, 64)` token slots per layer, where t is the
         longest row's span (rows right-aligned to it, prompt prefix and generated tokens included)
         and max_remaining the most tokens any row may still generate. Rows join in queue order while
         that reservation stays within M, each held row makes one token per step and leaves when done.
         The real arena also grew columns by at least half and never shrank; leaving that out only
         flatters it.

Reported per side: mean rows held per decode step (decode tokens / steps, the tail as the queue
empties included), the most held, and decode steps to finish the trace. The ratio pool / arena of
the mean is issue 12's memory target (>= 2x). Tokens are meaningless (random weights); decode cost
barely matters here, so the default model is a very small random Llama (the config is printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Sequence as Seq
from dataclasses import asdict, dataclass
from typing import Any

import torch

from softprompt.benchmarks.churn import random_llama
from softprompt.benchmarks.workload import make_prompts
from softprompt.server.config import ServerConfig
from softprompt.server.core import kv
from softprompt.server.core.admission import Admitted
from softprompt.server.core.engine import Batch, Engine, Sequence, TokenEvent
from softprompt.server.core.model import BaseModel
from softprompt.server.core.pool import BLOCK_SIZE, KvPool, LayerShape
from softprompt.prompts.options import DecodingOptions
from softprompt.server.core.scheduler import Scheduler

SEED = 0
ARENA_COLUMN_ALIGN = 64  # the deleted arena's COLUMN_ALIGN
MAX_ROWS = 256


@dataclass(frozen=True)
class Trace:
    """The workload: per request, input tokens, max_new_tokens and task (None: no prompt)."""

    inputs: list[int]
    max_new: list[int]
    tasks: list[int | None]
    virtual_tokens: int


def make_trace(requests: int, *, min_input: int = 16, max_input: int = 1024, min_new: int = 16,
               max_new: int = 512, virtual_tokens: int = 20, tasks: int = 8) -> Trace:
    """A seeded trace of uniform input and output lengths, prompts round-robin over `tasks`."""
    rng = random.Random(SEED)
    return Trace(inputs=[rng.randint(min_input, max_input) for _ in range(requests)],
                 max_new=[rng.randint(min_new, max_new) for _ in range(requests)],
                 tasks=[i % tasks if virtual_tokens else None for i in range(requests)],
                 virtual_tokens=virtual_tokens)


@dataclass(frozen=True)
class Held:
    """Rows held per decode step over a whole trace."""

    mean_rows: float
    max_rows: int
    steps: int
    preemptions: int = 0
    failed: int = 0
    mean_kv_tokens: float = 0.0  # KV token slots taken per step: the pool's used blocks, the arena's reservation


def power_of_two(value: int) -> int:
    """The deleted arena's row capacity for `value` rows: the smallest power of two at least `value`."""
    return 1 << max(0, value - 1).bit_length()


def arena_reservation(spans: list[int], remaining: list[int]) -> int:
    """Token slots per layer the arena reserved for rows of these spans and tokens still to generate."""
    columns = max(spans) + max(remaining)
    return power_of_two(len(spans)) * -(-columns // ARENA_COLUMN_ALIGN) * ARENA_COLUMN_ALIGN


def simulate_arena(trace: Trace, budget_tokens: int) -> Held:
    """Replays the arena's admission on `trace`: rows join in order while its reservation fits the budget."""
    queue = [(trace.virtual_tokens * (t is not None) + n, m)
             for n, m, t in zip(trace.inputs, trace.max_new, trace.tasks)]
    spans: list[int] = []  # per held row: KV columns written (its prefill made its first token)
    left: list[int] = []  # per held row: decode steps still to run
    steps = rows = most = reserved = 0
    while queue or spans:
        while queue and arena_reservation([*spans, queue[0][0]], [*left, queue[0][1] - 1]) <= budget_tokens:
            length, max_new = queue.pop(0)
            if max_new > 1:  # a row whose prefill made its only token never decodes
                spans.append(length)
                left.append(max_new - 1)
        if not spans:
            if queue:
                raise ValueError(f"a request's reservation alone exceeds {budget_tokens} tokens")
            break  # the last rows made their only token at prefill
        reserved += arena_reservation(spans, left)
        steps, rows, most = steps + 1, rows + len(spans), max(most, len(spans))
        spans, left = [s + 1 for s, r in zip(spans, left) if r > 1], [r - 1 for r in left if r > 1]
    return Held(mean_rows=rows / steps, max_rows=most, steps=steps, mean_kv_tokens=reserved / steps)


class RecordingEngine(Engine):
    """An Engine that records each decode step's rows and the pool's used blocks after it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_rows: list[int] = []
        self.step_blocks: list[int] = []

    def decode(self, batch: Batch) -> list[TokenEvent]:
        """Engine.decode, recorded."""
        events = super().decode(batch)
        self.step_rows.append(len(batch))
        self.step_blocks.append(self.kv_usage().used_blocks)
        return events


def measure_pool(base: BaseModel, trace: Trace, budget_bytes: int) -> Held:
    """Serves `trace` with the real scheduler and engine on a pool of `budget_bytes`; rows held per step."""
    engine = RecordingEngine(base, 64 << 20, ignore_eos=True, kv_cache_bytes=budget_bytes)
    prompts = make_prompts(base.model, max((t for t in trace.tasks if t is not None), default=-1) + 1,
                           trace.virtual_tokens, base.dtype)
    scheduler = Scheduler(engine, max_batch_size=MAX_ROWS, max_queued=len(trace.inputs),
                          max_prefill_tokens=ServerConfig().max_prefill_tokens)
    rng = random.Random(SEED)
    vocab = base.model.config.vocab_size
    handles = []
    for i, (n, m, task) in enumerate(zip(trace.inputs, trace.max_new, trace.tasks)):
        seq = Sequence(request_id=i, input_ids=[rng.randrange(vocab) for _ in range(n)],
                       params=DecodingOptions(max_new_tokens=m), prompt=None if task is None else prompts[task],
                       prompt_key=None if task is None else (f"memory-task-{task}", 1, "random"))
        engine.start(seq)
        handles.append(scheduler.submit(Admitted(seq, "", None)))  # all queued before the worker starts
    scheduler.start()
    failed = 0
    try:
        for handle, m in zip(handles, trace.max_new):
            try:
                result = handle.result()
            except Exception:  # noqa: BLE001 - counted: the benchmark asserts there are none
                failed += 1
                continue
            if len(result.token_ids) != m:
                raise AssertionError(f"a request made {len(result.token_ids)} tokens, not its {m} (ignore_eos)")
    finally:
        scheduler.close()
    steps = len(engine.step_rows)
    return Held(mean_rows=sum(engine.step_rows) / steps, max_rows=max(engine.step_rows), steps=steps,
                preemptions=scheduler.stats.preemptions, failed=failed,
                mean_kv_tokens=sum(engine.step_blocks) * BLOCK_SIZE / steps)


def measure(base: BaseModel, trace: Trace, pool_tokens: int) -> dict[str, Any]:
    """Both sides in the memory M of a pool that holds `pool_tokens` tokens, as a JSON-ready dict."""
    per_token = KvPool.bytes_per_token([LayerShape(h, d) for h, d in kv.layer_shapes(base.model)], base.dtype)
    budget_bytes = (pool_tokens + BLOCK_SIZE) * per_token  # the pool keeps one block back (its padding slots)
    budget_tokens = budget_bytes // per_token
    pool = measure_pool(base, trace, budget_bytes)
    arena = simulate_arena(trace, budget_tokens)
    return {"budget_tokens": budget_tokens, "budget_bytes": budget_bytes, "requests": len(trace.inputs),
            "pool": asdict(pool), "arena": asdict(arena), "ratio": pool.mean_rows / arena.mean_rows}


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m softprompt.benchmarks.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96, help="requests in the trace (default: 96)")
    parser.add_argument("--kv-tokens", type=int, default=16384,
                        help="tokens the pool holds; M is its memory, the arena's budget too (default: 16384)")
    parser.add_argument("--hidden", type=int, default=192, help="random model's hidden size (default: 192)")
    parser.add_argument("--layers", type=int, default=2, help="random model's layers (default: 2)")
    parser.add_argument("--virtual-tokens", type=int, default=20, help="soft-prompt length, 0 for none (default: 20)")
    parser.add_argument("--tasks", type=int, default=8, help="distinct soft prompts (default: 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser


def main(argv: Seq[str] | None = None) -> int:
    """Prints the configuration, both sides and their ratio; with --json, writes them too."""
    parser = build_parser()
    a = parser.parse_args(argv)
    for name, value in (("--requests", a.requests), ("--kv-tokens", a.kv_tokens), ("--hidden", a.hidden),
                        ("--layers", a.layers), ("--tasks", a.tasks), ("--threads", a.threads)):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    if a.virtual_tokens < 0:
        parser.error(f"--virtual-tokens must be at least 0, got {a.virtual_tokens}")
    # Each preemption logs a warning; the count is reported instead.
    logging.getLogger("softprompt.server.core.scheduler").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        try:
            base, shape = random_llama(a.hidden, a.layers, torch.device("cpu"))
        except ValueError as e:
            parser.error(str(e))
        trace = make_trace(a.requests, virtual_tokens=a.virtual_tokens, tasks=a.tasks)
        figures = measure(base, trace, a.kv_tokens)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (a test) keeps its own setting
    print(f"model: random-weight Llama {json.dumps(shape)}, cpu ({base.dtype}), torch threads {a.threads}")
    prompts = f"{a.virtual_tokens} virtual tokens on {a.tasks} tasks" if a.virtual_tokens else "no prompts"
    print(f"{a.requests} requests queued at once: inputs 16-1024 tokens, max_new_tokens 16-512, {prompts}; "
          f"KV budget M = {figures['budget_tokens']} tokens = {figures['budget_bytes']} bytes")
    for name in ("pool", "arena"):
        h = Held(**figures[name])
        print(f"  {name:<6} {h.mean_rows:6.1f} rows held on average, {h.max_rows:4d} at most, {h.steps:5d} decode "
              f"steps, {h.mean_kv_tokens:8.0f} KV token slots taken on average, {h.preemptions} preemptions, "
              f"{h.failed} failed")
    print(f"  pool / arena: {figures['ratio']:.2f}x rows held on average")
    if a.json:
        with open(a.json, "w") as out:
            json.dump(figures, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
