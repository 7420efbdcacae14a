"""`python -m softprompt.benchmarks.overload`: a real server driven past its KV pool by many streaming clients.

Starts the server in-process on a free loopback port (as `softprompt serve` builds it) over a small
random Llama with a small KV pool (`--kv-tokens`), registers `--tasks` random soft prompts through
the client, then opens `--clients` concurrent gRPC streams at once (asyncio, one channel each), each
asking greedily for 64-128 new tokens (seeded) of one of `--distinct` requests: a prompt (or the bare
model) and a built-in input of ~32 tokens. The server's engine runs with `ignore_eos`, so every
stream makes exactly the tokens it asked for; the rows outgrow the pool, so the scheduler must hold
the rest in the queue and preempt rows (recomputing them later) rather than fail any request.

Reports requests ok and failed, preemptions and the most rows decoded at once (the scheduler's
counters), the wall time from the first stream's send to the last stream's end, and how many
completed outputs equal the no-cache reference: the model's full forward over
`[prompt ; input ; generated]` at every token, greedy, computed once per distinct request for its
longest ask (a shorter ask must be a prefix of it). The model's weights are scaled up so that its
logits are peaked and greedy choices are far from ties, as in the tests; tokens are still meaningless.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import tempfile
import time
from collections.abc import Sequence as Seq
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from softprompt.benchmarks.churn import random_llama
from softprompt.benchmarks.workload import build_texts, make_prompts
from softprompt.client import AsyncClient
from softprompt.server.app.server import build_app, shutdown, start
from softprompt.server.config import ServerConfig
from softprompt.server.core import kv
from softprompt.server.core.model import BaseModel
from softprompt.server.core.pool import BLOCK_SIZE, KvPool, LayerShape

SEED = 0
INPUT_TOKENS = 32


@dataclass(frozen=True)
class Plan:
    """The load: clients, their asks, the distinct requests they share, the pool."""

    clients: int = 256
    distinct: int = 16
    tasks: int = 3
    virtual_tokens: int = 20
    min_new: int = 64
    max_new: int = 128
    kv_tokens: int = 4096


@dataclass(frozen=True)
class Outcome:
    """What the run showed."""

    ok: int
    failed: int
    checked_equal: int  # completed outputs equal to the no-cache reference
    preemptions: int
    max_rows: int
    seconds: float
    pool_tokens: int


def peaked(base: BaseModel) -> BaseModel:
    """Scales the model's matrices 8x in place, so its logits are peaked and greedy choices far from ties."""
    with torch.no_grad():
        for p in base.model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return base


def reference_greedy(model: torch.nn.Module, prompt: torch.Tensor | None, input_ids: list[int],
                     max_new_tokens: int) -> list[int]:
    """The correctness reference: full forward over [prompt ; input ; generated], no KV cache, greedy, no EOS."""
    embed = model.get_input_embeddings()
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = embed(torch.tensor([input_ids + generated], dtype=torch.long, device=embed.weight.device))
            if prompt is not None:
                x = torch.cat([prompt[None].to(x), x], dim=1)
            logits = model(inputs_embeds=x, use_cache=False, logits_to_keep=1).logits[0, -1]
            generated.append(int(logits.argmax()))
    return generated


async def _stream(target: str, task: str, text: str, max_new: int) -> list[int] | BaseException:
    """One client's stream: its tokens, or the error it ended with."""
    try:
        async with AsyncClient(target, timeout=600.0) as client:
            return [t async for chunk in client.stream(task, text, max_new_tokens=max_new) for t in chunk.token_ids]
    except Exception as e:  # noqa: BLE001 - counted as a failed request
        return e


async def _drive(target: str, prompts: list[torch.Tensor], texts: list[str], asks: list[tuple[int, int]],
                 tasks: list[str]) -> tuple[list[list[int] | BaseException], list[list[int]], float]:
    """Registers the prompts, runs every stream at once; (outputs, each distinct request's input ids, seconds)."""
    async with AsyncClient(target, timeout=60.0) as client:
        for name, prompt in zip(tasks[1:], prompts):
            await client.register(name, prompt)
        ids = [list((await client.tokenize(t)).token_ids) for t in texts]
    start_s = time.perf_counter()
    outputs = await asyncio.gather(*(_stream(target, tasks[d % len(tasks)], texts[d], n) for d, n in asks))
    return list(outputs), ids, time.perf_counter() - start_s


def run(base: BaseModel, plan: Plan) -> Outcome:
    """Serves `plan` on a fresh server over `base` (whose weights should be `peaked`); what it showed."""
    per_token = KvPool.bytes_per_token([LayerShape(h, d) for h, d in kv.layer_shapes(base.model)], base.dtype)
    prompts = make_prompts(base.model, plan.tasks, plan.virtual_tokens, base.dtype) if plan.virtual_tokens else []
    tasks = ["", *(f"overload-{i}" for i in range(len(prompts)))]  # "" is the bare model
    texts = build_texts(base.tokenizer, plan.distinct, INPUT_TOKENS, None)
    rng = random.Random(SEED)
    asks = [(i % plan.distinct, rng.randint(plan.min_new, plan.max_new)) for i in range(plan.clients)]
    with tempfile.TemporaryDirectory() as store:
        config = ServerConfig(port=0, http_port=None, store=Path(store), kv_cache_memory=str((plan.kv_tokens + BLOCK_SIZE) * per_token),
                              max_batch_size=256, max_queued_requests=2 * plan.clients)
        app = build_app(config, base=base)
        app.scheduler.engine.ignore_eos = True  # every stream makes exactly the tokens it asked for
        server, port, health = start(app)
        try:
            outputs, ids, seconds = asyncio.run(_drive(f"127.0.0.1:{port}", prompts, texts, asks, tasks))
        finally:
            shutdown(app, server, health, grace_s=1.0)
        stats, pool_tokens = app.scheduler.stats, app.scheduler.engine.kv_usage().total_tokens
    longest = {d: max(n for e, n in asks if e == d) for d, _ in asks}
    references = {d: reference_greedy(base.model, _prompt(prompts, d % len(tasks)), ids[d], n)
                  for d, n in longest.items()}
    done = [(d, n, out) for (d, n), out in zip(asks, outputs) if not isinstance(out, BaseException)]
    return Outcome(ok=len(done), failed=len(outputs) - len(done),
                   checked_equal=sum(out == references[d][:n] for d, n, out in done),
                   preemptions=stats.preemptions, max_rows=stats.max_batch, seconds=seconds, pool_tokens=pool_tokens)


def _prompt(prompts: list[torch.Tensor], task: int) -> torch.Tensor | None:
    """Task index 0 is the bare model; task i > 0 runs prompts[i - 1]."""
    return prompts[task - 1] if task else None


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m softprompt.benchmarks.overload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=256, help="concurrent streaming clients (default: 256)")
    parser.add_argument("--distinct", type=int, default=16, help="distinct requests the clients share (default: 16)")
    parser.add_argument("--tasks", type=int, default=3, help="random soft prompts besides the bare model (default: 3)")
    parser.add_argument("--virtual-tokens", type=int, default=20, help="soft-prompt length, 0 for none (default: 20)")
    parser.add_argument("--min-new", type=int, default=64, help="fewest new tokens a client asks for (default: 64)")
    parser.add_argument("--max-new", type=int, default=128, help="most new tokens a client asks for (default: 128)")
    parser.add_argument("--kv-tokens", type=int, default=4096, help="tokens the KV pool holds (default: 4096)")
    parser.add_argument("--hidden", type=int, default=192, help="random model's hidden size (default: 192)")
    parser.add_argument("--layers", type=int, default=2, help="random model's layers (default: 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser


def main(argv: Seq[str] | None = None) -> int:
    """Prints the configuration and the outcome; with --json, writes them too. Exits 1 unless every request
    completed with the reference's tokens."""
    parser = build_parser()
    a = parser.parse_args(argv)
    for name, value in vars(a).items():
        if isinstance(value, int) and value < (0 if name == "virtual_tokens" else 1):
            parser.error(f"--{name.replace('_', '-')} must be at least {int(name != 'virtual_tokens')}, got {value}")
    if a.min_new > a.max_new:
        parser.error(f"--min-new ({a.min_new}) must be at most --max-new ({a.max_new})")
    plan = Plan(clients=a.clients, distinct=a.distinct, tasks=a.tasks if a.virtual_tokens else 0,
                virtual_tokens=a.virtual_tokens, min_new=a.min_new, max_new=a.max_new, kv_tokens=a.kv_tokens)
    logging.getLogger("softprompt.server.core.scheduler").setLevel(logging.ERROR)  # preemptions are counted
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        try:
            base, shape = random_llama(a.hidden, a.layers, torch.device("cpu"))
        except ValueError as e:
            parser.error(str(e))
        outcome = run(peaked(base), plan)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (a test) keeps its own setting
    print(f"model: random-weight Llama {json.dumps(shape)} (matrices x8), cpu ({base.dtype}), "
          f"torch threads {a.threads}")
    print(f"{plan.clients} streaming clients at once over {plan.distinct} distinct requests ({plan.tasks} prompts of "
          f"{plan.virtual_tokens} virtual tokens and the bare model, ~{INPUT_TOKENS}-token inputs), "
          f"{plan.min_new}-{plan.max_new} new tokens each, greedy, ignore_eos; KV pool of {outcome.pool_tokens} tokens")
    o = outcome
    print(f"  {o.ok} ok, {o.failed} failed, {o.checked_equal}/{o.ok} equal to the no-cache reference, "
          f"{o.preemptions} preemptions, {o.max_rows} rows at most, {o.seconds:.1f} s")
    if a.json:
        with open(a.json, "w") as out:
            json.dump({"plan": asdict(plan), "outcome": asdict(outcome)}, out, indent=2)
    return 0 if o.failed == 0 and o.checked_equal == o.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
