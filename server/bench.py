"""`softprompt bench`: our engine and server against the usual ways of serving soft prompts.

Every method runs in this one process, on the same loaded model, over the same requests, and
generates exactly `--new-tokens` tokens per request, so their tokens/s compare:

  (a) HF `generate`, one request at a time, the prompt prepended through `inputs_embeds`;
  (b) HF `generate`, every request in one left-padded batch through `inputs_embeds`;
  (c) PEFT `PeftModel.generate`, one batch per task, on a separate copy of the model;
  (d) our engine offline: admission + scheduler, no gRPC;
  (e) our server over gRPC on loopback, with concurrent streaming clients.

Ratios are against (a). All requests arrive at once (t0); latency runs from a request's arrival
(for (e): from its client's send) to its last token.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from softprompt.server.model import BaseModel, _parse_dtype, default_cache_dir, default_device, default_dtype
from softprompt.server.model import load_base_model, resolve_model_path

METHODS: dict[str, tuple[str, str]] = {
    "a": ("hf-sequential", "HF generate, one request at a time"),
    "b": ("hf-batch", "HF generate, one left-padded batch"),
    "c": ("peft", "PEFT generate, one batch per task"),
    "d": ("engine", "softprompt engine, offline"),
    "e": ("grpc", "softprompt server, gRPC streams"),
    "f": ("grpc-training", "softprompt server, gRPC streams, while a training job runs"),
    "g": ("hf-static", "HF generate, one batch, static cache, no prompt"),
    "h": ("engine-one-task", "softprompt engine, offline, every request on task 0"),
}
# Methods whose rows carry other prompts than (d)'s (or none): their ids are not comparable with (d).
OTHER_PROMPTS = frozenset({"g", "h"})
# Warm-up runs only need every kernel and code path touched once; a few tokens do that.
WARMUP_TOKENS = 4
REGISTRATION_TASK = "bench-fresh"  # (e) registers new versions of this task and times their first request
REGISTRATION_ROUNDS = 10
SEED = 1234

# Built-in inputs: plain sentences, repeated to the asked length so no data set is needed.
SENTENCES = (
    "The committee postponed its decision until the budget figures were checked again.",
    "A small cafe on the corner sells bread that is baked before sunrise every day.",
    "Rain is expected in the north tomorrow, with clearer skies reaching the coast by evening.",
    "She fixed the old bicycle with parts taken from two others that no longer worked.",
    "The museum opens a new exhibition of early photographs of the harbour next month.",
    "Customers said the delivery was late but the product itself worked exactly as described.",
    "Engineers measured the bridge after the storm and found no damage to its supports.",
    "The recipe needs two eggs, a cup of flour, some milk and a pinch of salt.",
)


# ---------------------------------------------------------------------- settings and workload


@dataclass(frozen=True)
class Settings:
    """The bench's flags, parsed."""

    requests: int
    tasks: int
    virtual_tokens: int
    new_tokens: int
    input_tokens: int
    data: Path | None
    clients: int
    batch_size: int
    model: str | None
    device: str | None
    dtype: str | None
    random_weights: Path | None
    skip: frozenset[str]
    json_out: Path | None
    warmup: int


@dataclass(frozen=True)
class Workload:
    """The requests every method serves: per request its text, token ids and task; per task its prompt."""

    texts: list[str]
    input_ids: list[list[int]]
    task_of: list[int]
    prompts: list[torch.Tensor]  # [virtual_tokens, hidden], model dtype and device

    @property
    def tasks(self) -> int:
        """Distinct prompts."""
        return len(self.prompts)


def build_texts(tokenizer: Any, count: int, input_tokens: int, data: Path | None) -> list[str]:
    """One input per request: lines of `data` ({"input": ...} JSONL, cycled) or built-in sentences."""
    if data is not None:
        lines = [json.loads(line)["input"] for line in data.read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{data} holds no {{\"input\": ...}} lines")
        return [lines[i % len(lines)] for i in range(count)]
    words = " ".join(SENTENCES).split()
    texts = []
    for i in range(count):
        # Each request starts at another word (7 is coprime with the word count), so no two of the
        # first len(words) requests share a text; a word is at least one token, hence 2x words.
        start = i * 7
        long = " ".join(words[(start + k) % len(words)] for k in range(2 * input_tokens + 8))
        ids = tokenizer(long, add_special_tokens=False).input_ids[:input_tokens]
        texts.append(tokenizer.decode(ids).strip())
    return texts


def make_prompts(model: torch.nn.Module, tasks: int, virtual_tokens: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Seeded random prompts whose rows have the embedding matrix's mean row norm.

    N(0, 1) rows would be far larger than real token embeddings and push the model off its inputs'
    scale; matching the norm keeps the attention pattern realistic.
    """
    weight = model.get_input_embeddings().weight.detach().float()
    norm = float(weight.norm(dim=-1).mean())
    gen = torch.Generator().manual_seed(SEED)
    prompts = []
    for _ in range(tasks):
        rows = torch.randn(virtual_tokens, weight.shape[1], generator=gen)
        rows = rows / rows.norm(dim=-1, keepdim=True) * norm
        prompts.append(rows.to(device=weight.device, dtype=dtype))
    return prompts


def build_workload(base: BaseModel, s: Settings) -> Workload:
    """Inputs tokenized like admission does (no chat template), tasks round-robin over requests."""
    texts = build_texts(base.tokenizer, s.requests, s.input_tokens, s.data)
    return Workload(
        texts=texts,
        input_ids=[list(base.tokenizer(t).input_ids) for t in texts],
        task_of=[i % s.tasks for i in range(s.requests)],
        prompts=make_prompts(base.model, s.tasks, s.virtual_tokens, base.dtype),
    )


def task_name(task: int) -> str:
    """The registry name of a task's prompt."""
    return f"bench-task-{task}"


# ---------------------------------------------------------------------- model


def random_weight_model(config_json: Path, tokenizer_model: str | None, device: str | None,
                        dtype: str | None) -> BaseModel:
    """A model of the config's shape with random weights (no download), and the tokenizer of `tokenizer_model`.

    Speed depends on shapes, not weight values, so this measures e.g. a 1B model on a GPU box
    that has no weights; generated text is meaningless.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from softprompt.prompts.base import spec_of

    dev = torch.device(device) if device else default_device()
    dt = _parse_dtype(dtype) if dtype else default_dtype(dev)
    values = json.loads(config_json.read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(SEED)
    with dev:  # initialising on the device: a 1B model's CPU init takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    model.eval()
    model.requires_grad_(False)
    path, _ = resolve_model_path(tokenizer_model, default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer of {path} has {len(tokenizer)} tokens but {config_json} has vocab_size "
                         f"{config.vocab_size}: use a config with at least as many")
    return BaseModel(model=model, tokenizer=tokenizer, spec=spec_of(model, f"random:{config_json.name}"),
                     device=dev, dtype=dt)


def load_model(s: Settings) -> BaseModel:
    """The model every method shares."""
    if s.random_weights is not None:
        return random_weight_model(s.random_weights, s.model, s.device, s.dtype)
    return load_base_model(s.model, device=s.device, dtype=s.dtype)


# ---------------------------------------------------------------------- measurements


@dataclass
class Outcome:
    """One run of a method: per request its generated ids, latency and (our server only) time to first token."""

    outputs: list[list[int]]
    latencies: list[float]
    ttfts: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodResult:
    """The figures of one method's timed run."""

    key: str
    name: str
    label: str
    wall_s: float
    generated_tokens: int
    tokens_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    peak_memory_bytes: int
    memory_kind: str
    other_load_cores: float | None  # CPU cores other processes used during the run
    outputs: list[list[int]]
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated like numpy's default."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def reset_peak_memory(device: torch.device) -> None:
    """Starts a fresh CUDA peak; the CPU's peak RSS cannot be reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are): CUDA's peak allocation, or the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS"


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, of this process) so far; None off Linux.

    Their difference over a run is what other processes took, which tells a clean figure from one
    measured on a busy (shared) machine.
    """
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    # user..steal; guest time is already counted in user. Steal (other VMs) counts as contention too.
    busy = (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return busy, own.user + own.system


def other_load(before: tuple[float, float] | None, after: tuple[float, float] | None, wall: float) -> float | None:
    """CPU cores other processes kept busy on average between two `cpu_seconds` readings."""
    if before is None or after is None or wall <= 0:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall)


def sync(device: torch.device) -> None:
    """Waits for queued device work so wall times include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- methods


class Runner(Protocol):
    """A method under test: set up in its constructor, `run` repeatedly, `close` once."""

    def run(self, new_tokens: int) -> Outcome:
        """Serves every request of the workload, each generating exactly `new_tokens` tokens."""
        ...

    def close(self) -> None:
        """Releases what the constructor took."""
        ...


def row_embeds(model: torch.nn.Module, prompt: torch.Tensor, input_ids: list[int]) -> torch.Tensor:
    """cat(prompt, embed(ids)): one request's model input, [positions, hidden]."""
    ids = torch.tensor(input_ids, device=prompt.device)
    return torch.cat([prompt, model.get_input_embeddings()(ids)])


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks rows right-aligned, as decoder-only generation needs; returns (embeds, attention_mask)."""
    width = max(r.shape[0] for r in rows)
    first = rows[0]
    embeds = first.new_zeros(len(rows), width, first.shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=first.device)
    for i, r in enumerate(rows):
        embeds[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    return embeds, mask


def pad_token_id(base: BaseModel) -> int:
    """The id HF generate pads with (never produced here: min_new_tokens keeps rows running)."""
    tok = base.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def hf_generate(base: BaseModel, embeds: torch.Tensor, mask: torch.Tensor, new_tokens: int,
                **options: Any) -> list[list[int]]:
    """Greedy HF generate over inputs_embeds; exactly `new_tokens` new ids per row."""
    out = base.model.generate(
        inputs_embeds=embeds, attention_mask=mask, do_sample=False, **options,
        # min == max: EOS is suppressed, so every method produces the same number of tokens.
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id(base),
    )
    return out[:, -new_tokens:].tolist()


class HFSequential:
    """(a) One `generate` call per request, in arrival order."""

    def __init__(self, base: BaseModel, work: Workload) -> None:
        self.base, self.work = base, work

    @torch.inference_mode()
    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`."""
        t0 = time.perf_counter()
        outputs, latencies = [], []
        for ids, task in zip(self.work.input_ids, self.work.task_of):
            x = row_embeds(self.base.model, self.work.prompts[task], ids)[None]
            mask = torch.ones(1, x.shape[1], dtype=torch.long, device=x.device)
            outputs += hf_generate(self.base, x, mask, new_tokens)
            latencies.append(time.perf_counter() - t0)
        return Outcome(outputs, latencies)

    def close(self) -> None:
        """Nothing to release."""


class HFBatch:
    """(b) Every request in one left-padded `generate` call."""

    def __init__(self, base: BaseModel, work: Workload) -> None:
        self.base, self.work = base, work

    @torch.inference_mode()
    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`."""
        t0 = time.perf_counter()
        rows = [row_embeds(self.base.model, self.work.prompts[t], ids)
                for ids, t in zip(self.work.input_ids, self.work.task_of)]
        outputs = hf_generate(self.base, *left_pad(rows), new_tokens)
        return Outcome(outputs, [time.perf_counter() - t0] * len(outputs))

    def close(self) -> None:
        """Nothing to release."""


class HFStaticBare:
    """(g) The issue's plain-HF ceiling: the inputs alone (no prompt) in one batch, with a static KV cache."""

    def __init__(self, base: BaseModel, work: Workload) -> None:
        self.base, self.work = base, work

    @torch.inference_mode()
    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`."""
        t0 = time.perf_counter()
        embed = self.base.model.get_input_embeddings()
        rows = [embed(torch.tensor(ids, device=self.base.device)) for ids in self.work.input_ids]
        outputs = hf_generate(self.base, *left_pad(rows), new_tokens, cache_implementation="static")
        return Outcome(outputs, [time.perf_counter() - t0] * len(outputs))

    def close(self) -> None:
        """Nothing to release."""


class PeftPerTask:
    """(c) PEFT prompt tuning, one adapter per task on a private copy of the model, one batch per task."""

    def __init__(self, base: BaseModel, work: Workload, virtual_tokens: int) -> None:
        from peft import PromptTuningConfig, get_peft_model

        self.base, self.work = base, work
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
        # PEFT wraps the model it is given; a copy keeps the served model untouched.
        self.model = get_peft_model(copy.deepcopy(base.model), config, adapter_name=task_name(0))
        for task in range(1, work.tasks):
            self.model.add_adapter(task_name(task), config)
        with torch.no_grad():
            for task, prompt in enumerate(work.prompts):
                self.model.prompt_encoder[task_name(task)].embedding.weight.copy_(prompt)
        self.model.eval()

    @torch.inference_mode()
    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`."""
        n = len(self.work.input_ids)
        outputs: list[list[int]] = [[] for _ in range(n)]
        latencies = [0.0] * n
        t0 = time.perf_counter()
        for task in range(self.work.tasks):
            rows = [i for i in range(n) if self.work.task_of[i] == task]
            if not rows:
                continue
            self.model.set_adapter(task_name(task))
            ids, mask = self._left_padded_ids([self.work.input_ids[i] for i in rows])
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=pad_token_id(self.base))
            done = time.perf_counter() - t0
            for row, generated in zip(rows, out[:, ids.shape[1]:].tolist()):
                outputs[row], latencies[row] = generated, done
        return Outcome(outputs, latencies)

    def _left_padded_ids(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = pad_token_id(self.base)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.base.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.base.device)
        return ids, mask

    def close(self) -> None:
        """Frees the model copy."""
        del self.model
        gc.collect()
        if self.base.device.type == "cuda":
            torch.cuda.empty_cache()


class EngineTimers:
    """Wraps an Engine's methods on the instance to total their time: where a step's time goes."""

    PARTS = ("prefill", "decode", "_emit", "filter", "concatenate")

    def __init__(self, engine: Any) -> None:
        self.totals = {p: [0, 0.0] for p in self.PARTS}
        for part in self.PARTS:
            setattr(engine, part, self._timed(part, getattr(engine, part)))

    def _timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        # No device sync here: it would stall the engine's GPU pipelining. Prefill and decode end in
        # `.tolist()` of the sampled ids, which waits for the GPU anyway; filter/concatenate are
        # launch-only on a GPU and their device time shows up in the next decode.
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[part][0] += 1
                self.totals[part][1] += time.perf_counter() - start
        return wrapper

    def snapshot(self) -> dict[str, tuple[int, float]]:
        """Calls and seconds per part so far."""
        return {p: (int(c), float(s)) for p, (c, s) in self.totals.items()}


def engine_config(s: Settings, work: Workload, store: Path) -> Any:
    """A server config whose limits admit the whole workload at once."""
    from softprompt.server.config import ServerConfig

    longest = max(len(ids) for ids in work.input_ids)
    return ServerConfig(
        port=0, model=s.model, device=s.device, dtype=s.dtype, store=store, max_batch_size=s.batch_size,
        max_queued_requests=max(256, s.requests), max_new_tokens=max(1024, s.new_tokens),
        max_input_tokens=max(2048, longest), max_virtual_tokens=max(256, s.virtual_tokens),
    )


def build_bench_app(s: Settings, base: BaseModel, work: Workload, store: Path) -> tuple[Any, EngineTimers]:
    """An App on the shared model and prompt store, registering the prompts if the store has none yet."""
    from softprompt.prompts.format import PromptTensor
    from softprompt.server.app import build_app

    app = build_app(engine_config(s, work, store), base=base)
    # Bench process only: with no EOS every request runs to max_new_tokens, like HF with min_new_tokens.
    app.admission.engine.eos_ids = frozenset()
    if not app.registry.tasks():
        for task, prompt in enumerate(work.prompts):
            # The dtype-cast values, widened losslessly: the engine serves exactly what HF gets.
            app.registry.register(task_name(task), PromptTensor(embeddings=prompt.float().cpu(), source_type="RAW"),
                                  base.spec)
    return app, EngineTimers(app.admission.engine)


def engine_extra(app: Any, timers: EngineTimers, before: dict[str, tuple[int, float]], stats0: Any,
                 wall: float) -> dict[str, Any]:
    """The scheduler's steps and the engine's time split for one run."""
    after = timers.snapshot()
    parts = {p: {"calls": after[p][0] - before[p][0], "seconds": after[p][1] - before[p][1]} for p in after}
    stats = app.scheduler.stats
    busy = sum(parts[p]["seconds"] for p in ("prefill", "decode", "filter", "concatenate"))
    return {
        "engine": parts,
        "outside_engine_s": wall - busy,
        "decode_steps": stats.steps - stats0.steps,
        "prefills": stats.prefills - stats0.prefills,
        "max_batch": stats.max_batch,
    }


class EngineOffline:
    """(d) admission + scheduler in-process: every request submitted at once, one reader thread each.

    (h) is the same with every request on the first task: (d)/(h) is what mixing tasks costs.
    """

    def __init__(self, s: Settings, base: BaseModel, work: Workload, store: Path, *, one_task: bool = False) -> None:
        self.work = replace(work, task_of=[0] * len(work.task_of)) if one_task else work
        self.app, self.timers = build_bench_app(s, base, work, store)
        self.app.scheduler.start()
        self.readers = ThreadPoolExecutor(max_workers=len(work.texts), thread_name_prefix="bench-reader")

    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`."""
        from softprompt.server.types import DecodingOptions, GenerationRequest

        before, stats0 = self.timers.snapshot(), copy.copy(self.app.scheduler.stats)
        options = DecodingOptions(max_new_tokens=new_tokens)
        t0 = time.perf_counter()
        futures = []
        for text, task in zip(self.work.texts, self.work.task_of):
            sent = time.perf_counter()
            admitted = self.app.admission.admit(GenerationRequest(task_name(task), text, options))
            handle = self.app.scheduler.submit(admitted)
            futures.append(self.readers.submit(_read_handle, handle, sent))
        results = [f.result() for f in futures]
        wall = time.perf_counter() - t0
        return Outcome([r[0] for r in results], [r[2] for r in results], [r[1] for r in results],
                       engine_extra(self.app, self.timers, before, stats0, wall))

    def close(self) -> None:
        """Stops the scheduler."""
        self.readers.shutdown()
        self.app.scheduler.close(0.0)


def _read_handle(handle: Any, sent: float) -> tuple[list[int], float, float]:
    """Drains a handle: (ids, time to first token, latency), both from `sent`."""
    ids: list[int] = []
    first = None
    for chunk in handle.chunks():
        first = first or time.perf_counter()
        ids.extend(chunk.token_ids)
    return ids, (first or time.perf_counter()) - sent, time.perf_counter() - sent


class GrpcServer:
    """(e) the real server on 127.0.0.1, one streaming client per thread, each sending its share of the requests."""

    def __init__(self, s: Settings, base: BaseModel, work: Workload, store: Path) -> None:
        from softprompt.client import Client
        from softprompt.server.app import start

        self.work = work
        self.app, self.timers = build_bench_app(s, base, work, store)
        self.server, port, self.health = start(self.app)
        n = max(1, min(s.clients, len(work.texts)))
        self.clients = [Client(f"127.0.0.1:{port}", timeout=3600) for _ in range(n)]
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="bench-client")

    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`."""
        n = len(self.work.texts)
        before, stats0 = self.timers.snapshot(), copy.copy(self.app.scheduler.stats)
        results: list[tuple[list[int], float, float]] = [([], 0.0, 0.0)] * n
        go = threading.Event()

        def client_loop(c: int) -> None:
            go.wait()
            for i in range(c, n, len(self.clients)):
                task = task_name(self.work.task_of[i])
                results[i] = _stream_one(self.clients[c], task, self.work.texts[i], new_tokens)

        futures = [self.pool.submit(client_loop, c) for c in range(len(self.clients))]
        t0 = time.perf_counter()
        go.set()
        for f in futures:
            f.result()
        wall = time.perf_counter() - t0
        return Outcome([r[0] for r in results], [r[2] for r in results], [r[1] for r in results],
                       engine_extra(self.app, self.timers, before, stats0, wall))

    def probe_registration(self, rounds: int = REGISTRATION_ROUNDS) -> dict[str, float]:
        """Seconds from RegisterPrompt returning to the first streamed token of the next request for that
        version (p50 over `rounds` new versions), and for the same request once the version is warm."""
        client, text = self.clients[0], self.work.texts[0]
        g = torch.Generator().manual_seed(11)
        fresh, warm = [], []
        for _ in range(rounds):
            prompt = self.work.prompts[0].float().cpu()
            info = client.register(REGISTRATION_TASK, prompt + 0.01 * torch.randn(prompt.shape, generator=g))
            version = info.ref
            for times in (fresh, warm):
                t0 = time.perf_counter()
                chunk = next(iter(client.stream(REGISTRATION_TASK, text, max_new_tokens=1)))
                times.append(time.perf_counter() - t0)
                if chunk.prompt_version != version:
                    raise RuntimeError(f"the request after registering {version} was served {chunk.prompt_version}")
        return {"fresh_p50_s": percentile(fresh, 50), "warm_p50_s": percentile(warm, 50), "rounds": rounds}

    def close(self) -> None:
        """Closes the clients and drains the server."""
        from softprompt.server.app import shutdown

        for client in self.clients:
            client.close()
        self.pool.shutdown()
        shutdown(self.app, self.server, self.health, grace_s=1.0)


class GrpcWhileTraining(GrpcServer):
    """(f) as (e), while a server-side training job runs on the same in-memory model.

    The ratio f/e is what a running job costs serving (the server's --train-share bounds it);
    the job's steps during the run show what training still gets.
    """

    def __init__(self, s: Settings, base: BaseModel, work: Workload, store: Path) -> None:
        from softprompt.client import TrainingOptions

        super().__init__(s, base, work, store)
        data = [{"input": text, "target": ("negative", "positive")[i % 2]} for i, text in enumerate(work.texts)]
        options = TrainingOptions(num_virtual_tokens=s.virtual_tokens, epochs=1_000_000, eval_fraction=0.0, patience=0)
        client = self.clients[0]
        self.job_id = client.train("bench-training", data, options=options).job_id
        for job in client.watch_training_job(self.job_id):
            if job.done:
                raise RuntimeError(f"the benchmark's training job ended early: {job.state} {job.error}")
            if job.progress is not None and job.progress.step >= 1:
                break

    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`; adds the training steps the job made during the run."""
        step0, units0 = self._steps(), self.app.scheduler.stats.side_units
        outcome = super().run(new_tokens)
        outcome.extra["training_steps"] = self._steps() - step0
        outcome.extra["training_units"] = self.app.scheduler.stats.side_units - units0
        return outcome

    def _steps(self) -> int:
        progress = self.clients[0].get_training_job(self.job_id).progress
        return 0 if progress is None else progress.step

    def close(self) -> None:
        """Cancels the job, then drains the server."""
        self.clients[0].cancel_training_job(self.job_id)
        self.clients[0].wait_for_training_job(self.job_id, timeout=600)
        super().close()


def _stream_one(client: Any, task: str, text: str, new_tokens: int) -> tuple[list[int], float, float]:
    """One streamed request: (ids, time to first token, latency), both from the send."""
    ids: list[int] = []
    first = None
    sent = time.perf_counter()
    for chunk in client.stream(task, text, max_new_tokens=new_tokens):
        first = first or time.perf_counter()
        ids.extend(chunk.token_ids)
    return ids, (first or time.perf_counter()) - sent, time.perf_counter() - sent


def make_runner(key: str, s: Settings, base: BaseModel, work: Workload, store: Path) -> Runner:
    """Builds method `key`'s runner (setup is not timed)."""
    if key == "a":
        return HFSequential(base, work)
    if key == "b":
        return HFBatch(base, work)
    if key == "c":
        return PeftPerTask(base, work, s.virtual_tokens)
    if key == "d":
        return EngineOffline(s, base, work, store)
    if key == "e":
        return GrpcServer(s, base, work, store)
    if key == "f":
        return GrpcWhileTraining(s, base, work, store)
    if key == "g":
        return HFStaticBare(base, work)
    return EngineOffline(s, base, work, store, one_task=True)


# ---------------------------------------------------------------------- running


def progress(message: str) -> None:
    """One log line per phase, on stderr so stdout keeps only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(key: str, s: Settings, base: BaseModel, work: Workload, store: Path) -> MethodResult:
    """Sets a method up, warms it, times one run, and checks it made exactly `new_tokens` per request."""
    name, label = METHODS[key]
    progress(f"({key}) {label}: setting up")
    runner = make_runner(key, s, base, work, store)
    try:
        for i in range(s.warmup):
            progress(f"({key}) warm-up {i + 1}/{s.warmup} ({min(WARMUP_TOKENS, s.new_tokens)} tokens, not timed)")
            runner.run(min(WARMUP_TOKENS, s.new_tokens))
        progress(f"({key}) timed run")
        reset_peak_memory(base.device)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        outcome = runner.run(s.new_tokens)
        sync(base.device)
        wall = time.perf_counter() - t0
        others = other_load(cpu0, cpu_seconds(), wall)
        memory, kind = peak_memory(base.device)
        if key == "e":
            progress("(e) registering new versions and timing their first requests")
            outcome.extra["registration"] = runner.probe_registration()  # type: ignore[attr-defined]
    finally:
        runner.close()
    made = [len(o) for o in outcome.outputs]
    if any(m != s.new_tokens for m in made):
        raise RuntimeError(f"({key}) {label} generated {made} tokens, not {s.new_tokens} per request")
    generated = sum(made)
    ttfts = outcome.ttfts
    result = MethodResult(
        key=key, name=name, label=label, wall_s=wall, generated_tokens=generated, tokens_per_s=generated / wall,
        latency_p50_s=percentile(outcome.latencies, 50), latency_p99_s=percentile(outcome.latencies, 99),
        ttft_p50_s=percentile(ttfts, 50) if ttfts else None, ttft_p99_s=percentile(ttfts, 99) if ttfts else None,
        peak_memory_bytes=memory, memory_kind=kind, other_load_cores=others, outputs=outcome.outputs,
        extra=outcome.extra,
    )
    progress(f"({key}) {result.tokens_per_s:.1f} generated tokens/s in {wall:.2f} s")
    return result


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, torch threads and GPU, for the report's header."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "platform": platform.platform(),
    }


def versions() -> dict[str, str]:
    """Versions of the libraries whose speed is measured."""
    import grpc
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "grpcio": grpc.__version__}


def peft_note() -> str | None:
    """The known PEFT bug that makes (c)'s outputs wrong, when this transformers has it."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.24"):
        return None
    return ("(c) PeftModel.generate re-injects the soft prompt at every decoding step on transformers >= 5.24 "
            "(a known PEFT bug), so its outputs are wrong here; it is timed as the tool users would otherwise "
            "reach for.")


# ---------------------------------------------------------------------- report


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mib(value: int) -> str:
    return f"{value / 2**20:,.0f} MiB"


def agrees(ids: list[int], reference: list[int], eos_ids: frozenset[int]) -> bool:
    """Whether `ids` equals `reference` up to the reference's first EOS.

    Past that point the methods part ways by design: HF's min_new_tokens masks EOS and takes the
    runner-up, while our engine, its EOS check turned off here, emits EOS and goes on.
    """
    cut = next((k for k, token in enumerate(reference) if token in eos_ids), len(reference))
    return ids[:cut] == reference[:cut]


def table(results: list[MethodResult], eos_ids: frozenset[int]) -> list[str]:
    """The results table: throughput, ratio vs (a), latency, TTFT, memory, agreement with (d)."""
    baseline = next((r for r in results if r.key == "a"), None)
    reference = next((r for r in results if r.key == "d"), None)
    header = ("method", "tok/s", "wall s", "vs (a)", "lat p50", "lat p99", "TTFT p50", "TTFT p99", "peak mem",
              "ids = (d)", "others' CPU")
    rows = [header]
    for r in results:
        ratio = f"{r.tokens_per_s / baseline.tokens_per_s:.2f}x" if baseline else "n/a"
        same = "n/a"
        if reference is not None and r.key not in OTHER_PROMPTS:
            same = f"{sum(agrees(a, b, eos_ids) for a, b in zip(r.outputs, reference.outputs))}/{len(r.outputs)}"
        rows.append((f"({r.key}) {r.label}", f"{r.tokens_per_s:,.1f}", f"{r.wall_s:.2f}", ratio,
                     _seconds(r.latency_p50_s), _seconds(r.latency_p99_s), _seconds(r.ttft_p50_s),
                     _seconds(r.ttft_p99_s), _mib(r.peak_memory_bytes), same,
                     "n/a" if r.other_load_cores is None else f"{r.other_load_cores:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def engine_lines(results: list[MethodResult]) -> list[str]:
    """Where our engine's wall time went in (d) and (e)."""
    lines = []
    for r in results:
        if "engine" not in r.extra:
            continue
        e = r.extra["engine"]
        part = {p: f"{e[p]['seconds']:.2f} s/{e[p]['calls']}" for p in e}
        lines.append(
            f"({r.key}) engine time (s/calls): prefill {part['prefill']}, decode {part['decode']}, of which "
            f"sampling+detokenizing {part['_emit']}; filter {part['filter']}, concatenate {part['concatenate']}; "
            f"outside the engine {r.extra['outside_engine_s']:.2f} s; {r.extra['decode_steps']} decode steps, "
            f"{r.extra['prefills']} prefills, max batch {r.extra['max_batch']}"
        )
    return lines


def ratio_lines(results: list[MethodResult]) -> list[str]:
    """The ratios the performance targets are stated in, for the methods that ran."""
    by_key = {r.key: r.tokens_per_s for r in results}
    pairs = [("d", "h", "our engine, mixed tasks vs every request on one task"),
             ("d", "g", "our engine (mixed tasks) vs HF static cache without any prompt"),
             ("d", "b", "our engine vs one HF batch"),
             ("d", "c", "our engine vs PEFT one batch per task"),
             ("e", "d", "gRPC streams vs our engine offline")]
    return [f"({a})/({b}) {what}: {by_key[a] / by_key[b]:.2f}x" for a, b, what in pairs if a in by_key and b in by_key]


def registration_line(results: list[MethodResult]) -> list[str]:
    """How soon a new version serves, from (e)."""
    probe = next((r.extra["registration"] for r in results if "registration" in r.extra), None)
    if probe is None:
        return []
    return [f"(e) a newly registered version gave its first token {probe['fresh_p50_s'] * 1000:.0f} ms after "
            f"RegisterPrompt returned (p50 of {probe['rounds']} versions; the same request once the version was "
            f"cached: {probe['warm_p50_s'] * 1000:.0f} ms); each was served by the very next request"]


def eos_ids(base: BaseModel) -> frozenset[int]:
    """The ids our engine ends a request on (before this bench turns that off)."""
    from softprompt.server.engine import Engine

    return Engine(base).eos_ids


def identical(results: list[MethodResult]) -> bool | None:
    """Whether (d), (e) and (f), all our greedy engine, produced the same ids for every request."""
    ours = [r.outputs for r in results if r.key in ("d", "e", "f")]
    if len(ours) < 2:
        return None
    return all(o == ours[0] for o in ours[1:])


def training_line(results: list[MethodResult]) -> list[str]:
    """What a running training job costs serving: (f) against (e)."""
    by_key = {r.key: r for r in results}
    if "e" not in by_key or "f" not in by_key:
        return []
    e, f = by_key["e"], by_key["f"]
    return [f"(f)/(e): serving while a training job runs gets {f.tokens_per_s / e.tokens_per_s:.2f}x the "
            f"throughput of serving alone; p99 latency {f.latency_p99_s / e.latency_p99_s:.2f}x, p50 time to first "
            f"token {f.ttft_p50_s / e.ttft_p50_s:.2f}x; the job ran {f.extra['training_units']} units of work "
            f"({f.extra['training_steps']} optimizer steps completed) meanwhile"]


def report(s: Settings, base: BaseModel, work: Workload, results: list[MethodResult]) -> dict[str, Any]:
    """Prints the report to stdout and returns everything as a JSON-ready dict."""
    lengths = [len(ids) for ids in work.input_ids]
    settings = {
        "model": base.spec.model_id, "device": str(base.device), "dtype": str(base.dtype).removeprefix("torch."),
        "requests": s.requests, "tasks": s.tasks, "virtual_tokens": s.virtual_tokens, "new_tokens": s.new_tokens,
        "input_tokens": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)},
        "input_source": str(s.data) if s.data else "built-in sentences", "clients": min(s.clients, s.requests),
        "engine_max_batch": s.batch_size, "warmup_runs": s.warmup, "skipped": sorted(s.skip),
    }
    machine, libs = machine_info(base.device), versions()
    same = identical(results)
    notes = [
        "generated tokens/s = requests x new tokens / wall; every method makes exactly --new-tokens per request "
        "(HF: min_new_tokens = max_new_tokens; our engine: EOS disabled in this bench process).",
        "all requests arrive at once; latency = arrival to last token ((e): from its client's send); "
        "TTFT = submit to first streamed token.",
        "peak mem: " + ("torch.cuda.max_memory_allocated, reset before each timed run." if base.device.type == "cuda"
                        else "process-wide peak RSS so far (never resets: later methods include earlier ones)."),
        "ids = (d): requests whose greedy ids equal our engine's up to its first EOS (after it HF, which masks EOS "
        "for min_new_tokens, takes another token); informative: padding and kernels can flip near-ties.",
        "others' CPU: cores other processes kept busy during the timed run (/proc/stat); well above 0 means a "
        "shared, busy machine and slower, noisier figures.",
    ]
    if "c" in {r.key for r in results} and (note := peft_note()):
        notes.append(note)
    out = sys.stdout
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
          f"GPU {machine['gpu'] or 'none'}", file=out)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in libs.items()), file=out)
    print(f"settings: {settings['model']} on {settings['device']} ({settings['dtype']}); {s.requests} requests over "
          f"{s.tasks} tasks, {s.virtual_tokens} virtual tokens, input tokens {min(lengths)}-{max(lengths)} "
          f"(mean {settings['input_tokens']['mean']:.1f}, {settings['input_source']}), {s.new_tokens} new tokens; "
          f"{settings['clients']} gRPC clients; engine max batch {s.batch_size}; {s.warmup} warm-up run(s)", file=out)
    print(file=out)
    lines = [*table(results, eos_ids(base)), "", *engine_lines(results), *ratio_lines(results),
             *registration_line(results), *training_line(results)]
    for line in lines:
        print(line, file=out)
    print(f"outputs identical ((d), (e), (f)): {'n/a' if same is None else 'yes' if same else 'no'}", file=out)
    print(file=out)
    for note in notes:
        print(f"note: {note}", file=out)
    return {
        "machine": machine, "versions": libs, "settings": settings, "notes": notes, "outputs_identical": same,
        "methods": {r.key: {k: v for k, v in vars(r).items() if k != "key"} for r in results},
    }


# ---------------------------------------------------------------------- command line


def _skip_keys(value: str) -> frozenset[str]:
    aliases = {name: key for key, (name, _) in METHODS.items()} | {key: key for key in METHODS}
    aliases |= {"sequential": "a", "batch": "b", "server": "e", "training": "f"}
    keys = set()
    for item in filter(None, (v.strip().lower() for v in value.split(","))):
        if item not in aliases:
            known = ", ".join(sorted(aliases))
            raise argparse.ArgumentTypeError(f"unknown method {item!r}: use letters a-e or {known}")
        keys.add(aliases[item])
    return frozenset(keys)


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The `bench` argument parser."""
    parser = argparse.ArgumentParser(
        prog="softprompt bench",
        description="Measure our engine and gRPC server against HF generate and PEFT on one model and one "
                    "multi-task workload, in one process; prints generated tokens/s with ratios vs (a).\n\n"
                    + "\n".join(f"  ({k}) {label}" for k, (_, label) in METHODS.items()),
        epilog="examples:\n"
               "  softprompt bench                                    # defaults: 16 requests, 8 tasks\n"
               "  softprompt bench --requests 64 --clients 64 --skip peft --json out.json\n"
               "  softprompt bench --random-weights scripts/llama-3.2-1b-config.json --device cuda --new-tokens 128\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w = parser.add_argument_group("workload")
    w.add_argument("--requests", type=_positive, default=16, help="requests in the run (default: 16)")
    w.add_argument("--tasks", type=_positive, default=8,
                   help="distinct prompts, round-robin over requests (default: 8)")
    w.add_argument("--virtual-tokens", type=_positive, default=20, help="soft-prompt length (default: 20)")
    w.add_argument("--new-tokens", type=_positive, default=32, help="tokens generated per request (default: 32)")
    w.add_argument("--input-tokens", type=_positive, default=32,
                   help="approximate input length, from built-in sentences (default: 32)")
    w.add_argument("--data", type=Path, metavar="FILE.jsonl", help='real inputs: one {"input": "..."} per line, cycled')
    w.add_argument("--clients", type=_positive, help="concurrent gRPC streaming clients for (e) (default: --requests)")
    w.add_argument("--batch-size", type=_positive, default=64, help="our engine's max batch (default: 64)")
    m = parser.add_argument_group("model")
    m.add_argument("--model", help="Hugging Face id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    m.add_argument("--device", help="torch device, e.g. cpu, cuda (default: cuda if available)")
    m.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)")
    m.add_argument("--random-weights", type=Path, metavar="CONFIG_JSON",
                   help="random weights of this transformers config's shape; tokenizer from --model")
    r = parser.add_argument_group("run")
    r.add_argument("--skip", type=_skip_keys, default=frozenset(), metavar="a,b,...",
                   help="methods to skip, by letter or name (e.g. --skip peft or --skip a,c)")
    r.add_argument("--json", type=Path, dest="json_out", metavar="OUT", help="also write every figure to this file")
    r.add_argument("--warmup", type=int, default=1, help="untimed short runs per method first (default: 1)")
    return parser


def parse_settings(argv: list[str] | None) -> Settings:
    """Flags -> Settings."""
    a = build_parser().parse_args(argv)
    return Settings(
        requests=a.requests, tasks=a.tasks, virtual_tokens=a.virtual_tokens, new_tokens=a.new_tokens,
        input_tokens=a.input_tokens, data=a.data, clients=a.clients or a.requests, batch_size=a.batch_size,
        model=a.model, device=a.device, dtype=a.dtype, random_weights=a.random_weights, skip=a.skip,
        json_out=a.json_out, warmup=max(0, a.warmup),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `softprompt bench`; returns the exit status."""
    s = parse_settings(argv)
    with warnings.catch_warnings():
        # PEFT warns on every generate call that it ignores position ids; the report says what matters.
        warnings.filterwarnings("ignore", message=".*[Pp]osition ids are not supported.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        progress("loading the model")
        base = load_model(s)
        work = build_workload(base, s)
        results = []
        with tempfile.TemporaryDirectory(prefix="softprompt-bench-") as store:
            for key in METHODS:
                if key not in s.skip:
                    results.append(measure(key, s, base, work, Path(store)))
        figures = report(s, base, work, results)
    if s.json_out is not None:
        s.json_out.write_text(json.dumps(figures, indent=2) + "\n")
        progress(f"wrote {s.json_out}")
    return 0
