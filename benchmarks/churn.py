"""`python -m softprompt.benchmarks.churn`: decode throughput while rows leave and join every step.

Drives the Engine directly (prefill, decode, filter, concatenate; no scheduler, no gRPC) over one
batch of `--rows` rows, in two runs on the same model:

  no churn  every row has the same long `max_new_tokens`: `--steps` decode steps, nobody leaves;
  churn     rows' `max_new_tokens` are staggered so that 1-2 rows finish at every decode step; after
            each step the finished rows are filtered out and as many fresh rows are prefilled and
            concatenated in, keeping the batch at `--rows`.

Both report decode tokens/s (tokens made by decode steps over the wall time of the whole loop,
joiners' prefills, filters and concatenates included), tokens/s in all (the joiners' first tokens
too: where the engine runs mixed steps a joiner is prefilled inside the next decode step's forward,
so this is the figure that compares the two ways) and, from the engine's StepTimings, the
milliseconds per step of each part. The ratio churn / no churn (tokens in all) is what a KV layout in which a row
joining or leaving touches only its own KV should keep near 1 (issue 12's target: >= 0.9x); the
ratio without prefill time isolates the cost of moving KV, which no layout removes from prefill.
Each run also reports its mean attended width (columns per decode step), as decode time grows
with it: no-churn rows grow all run long, while churn rows are replaced young, so the churn run's
rows are shorter on average and its width is the layout's (longest span plus gaps), not the rows'.

Rows carry soft prompts (`--virtual-tokens` on `--tasks` tasks, round-robin, prefix KV cached)
and inputs of varied lengths, as served rows do; every row decodes greedily with `ignore_eos`, so
the lengths are exactly as planned. Tokens are meaningless: by default the model has random
weights, shaped like the default model but smaller so that both runs take well under a minute on
a 2-core CPU (the config is printed).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence as Seq
from dataclasses import asdict, dataclass
from typing import Any

import torch

from softprompt.benchmarks.workload import make_prompts
from softprompt.server.core.engine import STEP_PARTS, Batch, Engine, Sequence, StepTimings
from softprompt.server.core.model import BaseModel
from softprompt.prompts.options import DecodingOptions

SEED = 0
RANDOM = "random"
WARMUP_STEPS = 3  # untimed decode steps first: the first calls allocate the arena and warm kernels
PREFIX_CACHE_BYTES = 256 << 20


@dataclass(frozen=True)
class Plan:
    """What both runs do: batch size, timed steps, row shapes."""

    rows: int = 64
    steps: int = 128
    lifetime: int = 43  # decode steps a churn row lives: rows / lifetime rows finish per step (64/43 ~ 1.5)
    min_input: int = 16
    max_input: int = 64
    virtual_tokens: int = 20
    tasks: int = 8
    mixed_steps: bool = True  # joiners prefilled in the next decode step's forward (where the engine can)


@dataclass(frozen=True)
class RunFigures:
    """One run's measurements."""

    decode_tokens: int
    tokens_per_s: float  # every token made (decode steps' and joiners' first tokens) over the loop's wall time
    seconds: float  # wall time of the timed loop, everything in it
    decode_tokens_per_s: float
    mean_rows: float  # rows per decode step
    mean_width: float  # attended columns per decode step: the longest row's span plus gaps the layout leaves
    finished_per_step: float
    joined_per_step: float
    ms_per_step: dict[str, float]  # per StepTimings part, over the timed steps

    @property
    def seconds_without_prefill(self) -> float:
        """The loop's wall time less its prefills."""
        steps = self.decode_tokens / self.mean_rows
        return self.seconds - self.ms_per_step["prefill"] * steps / 1e3


class Rows:
    """Makes fresh rows: seeded input lengths and tokens, prompts round-robin over tasks."""

    def __init__(self, engine: Engine, base: BaseModel, plan: Plan) -> None:
        self.engine = engine
        self.plan = plan
        self.vocab = len(base.tokenizer)
        self.prompts = make_prompts(base.model, plan.tasks, plan.virtual_tokens, base.dtype) \
            if plan.virtual_tokens else []
        self.rng = random.Random(SEED)
        self.made = 0

    def make(self, max_new_tokens: int) -> Sequence:
        """A started row that will make exactly `max_new_tokens` tokens."""
        length = self.rng.randint(self.plan.min_input, self.plan.max_input)
        task = self.made % self.plan.tasks
        seq = Sequence(request_id=self.made, input_ids=[self.rng.randrange(self.vocab) for _ in range(length)],
                       params=DecodingOptions(max_new_tokens=max_new_tokens),
                       prompt=self.prompts[task] if self.prompts else None,
                       prompt_key=(f"churn-task-{task}", 1, "random") if self.prompts else None)
        self.engine.start(seq)
        self.made += 1
        return seq


def _timed_loop(engine: Engine, timings: StepTimings, batch: Batch, rows: Rows | None, steps: int,
                lifetime: int) -> RunFigures:
    """Runs `steps` decode steps; with `rows`, replaces each step's finished rows with fresh ones."""
    before = timings.snapshot()
    decode_tokens = made = finished = joined = width = 0
    joining: list[Sequence] = []  # mixed steps: rows prefilled in the next step's forward
    start = time.perf_counter()
    for _ in range(steps):
        decode_tokens += len(batch)
        made += len(batch) + len(joining)
        width += engine.shape_of(batch)[1]
        if joining:
            merged, _ = engine.step(batch, joining)
            assert merged is not None
            batch, joining = merged, []
        else:
            engine.decode(batch)
        keep = [i for i, s in enumerate(batch.sequences) if s.finish_reason is None]
        gone = len(batch) - len(keep)
        finished += gone
        if gone:
            kept = engine.filter(batch, keep)
            if rows is None or kept is None:
                raise RuntimeError("a no-churn row finished inside the timed steps")
            # A joiner finishes `lifetime` steps from now: prefilled now it makes a token more, mixed its first
            # token comes from the next step's forward.
            fresh = [rows.make(lifetime if engine.fuses_steps else lifetime + 1) for _ in range(gone)]
            joined += gone
            if engine.fuses_steps:
                batch, joining = kept, fresh
            else:
                batch = engine.concatenate([kept, engine.prefill(fresh)[0]])
                made += gone
    seconds = time.perf_counter() - start
    after = timings.snapshot()
    ms = {part: (after[part][1] - before[part][1]) * 1e3 / steps for part in STEP_PARTS}
    return RunFigures(decode_tokens=decode_tokens, tokens_per_s=made / seconds, seconds=seconds,
                      decode_tokens_per_s=decode_tokens / seconds,
                      mean_rows=decode_tokens / steps, mean_width=width / steps, finished_per_step=finished / steps,
                      joined_per_step=joined / steps, ms_per_step=ms)


def run_no_churn(base: BaseModel, plan: Plan) -> RunFigures:
    """`plan.rows` rows that all outlive the timed steps."""
    engine, timings = _engine(base, plan)
    rows = Rows(engine, base, plan)
    batch, _ = engine.prefill([rows.make(WARMUP_STEPS + plan.steps + 2) for _ in range(plan.rows)])
    for _ in range(WARMUP_STEPS):
        engine.decode(batch)
    return _timed_loop(engine, timings, batch, None, plan.steps, plan.lifetime)


def run_churn(base: BaseModel, plan: Plan) -> RunFigures:
    """`plan.rows` rows whose ends are staggered so that 1-2 finish per step, each replaced at once.

    Row i of the first batch finishes at decode step 1 + i * lifetime // rows (of those after the
    warm-up); a joiner lives exactly `lifetime` decode steps, so the pattern repeats with that period.
    """
    engine, timings = _engine(base, plan)
    rows = Rows(engine, base, plan)
    # A row with max_new_tokens m finishes at its (m - 1)th decode step (prefill makes its first token).
    batch, _ = engine.prefill([rows.make(WARMUP_STEPS + 2 + i * plan.lifetime // plan.rows)
                               for i in range(plan.rows)])
    for _ in range(WARMUP_STEPS):
        engine.decode(batch)
    return _timed_loop(engine, timings, batch, rows, plan.steps, plan.lifetime)


def _engine(base: BaseModel, plan: Plan) -> tuple[Engine, StepTimings]:
    timings = StepTimings()
    return Engine(base, PREFIX_CACHE_BYTES, ignore_eos=True, timings=timings, mixed_steps=plan.mixed_steps), timings


def measure(base: BaseModel, plan: Plan) -> dict[str, Any]:
    """Both runs on `base` and their ratios, as a JSON-ready dict."""
    if plan.rows < plan.lifetime:
        raise ValueError(f"rows ({plan.rows}) must be at least the row lifetime ({plan.lifetime}) for a row to "
                         f"finish at every step")
    still = run_no_churn(base, plan)
    churn = run_churn(base, plan)
    return {
        "plan": asdict(plan),
        "no_churn": asdict(still),
        "churn": asdict(churn),
        "ratio": churn.tokens_per_s / still.tokens_per_s,
        "ratio_without_prefill": (churn.decode_tokens / churn.seconds_without_prefill)
        / (still.decode_tokens / still.seconds_without_prefill),
    }


def random_llama(hidden: int, layers: int, device: torch.device) -> tuple[BaseModel, dict[str, Any]]:
    """A random-weight Llama shaped like the default model (SmolLM2-135M: vocab 49152, head_dim 64,
    3 query heads per KV head, MLP 8/3 x hidden) with `hidden` and `layers`, and the default model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from softprompt.prompts.base import spec_of
    from softprompt.server.app.loading import resolve_model_path
    from softprompt.server.config import default_cache_dir
    from softprompt.server.core.model import default_dtype

    if hidden % 192:
        raise ValueError(f"--hidden must be a multiple of 192 (3 query heads of 64 per KV head), got {hidden}")
    path, _ = resolve_model_path(None, default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    shape = dict(vocab_size=49152, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                 num_attention_heads=hidden // 64, num_key_value_heads=hidden // 192, max_position_embeddings=8192,
                 tie_word_embeddings=True)
    torch.manual_seed(SEED)
    dtype = default_dtype(device)
    with device:
        model = LlamaForCausalLM(LlamaConfig(**shape, eos_token_id=tokenizer.eos_token_id,
                                             pad_token_id=tokenizer.pad_token_id)).to(dtype)
    model.eval()
    model.requires_grad_(False)
    base = BaseModel(model=model, tokenizer=tokenizer, spec=spec_of(model, "random:churn-llama"), device=device,
                     dtype=dtype)
    return base, shape


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m softprompt.benchmarks.churn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="batch size of both runs (default: 64)")
    parser.add_argument("--steps", type=int, default=128, help="timed decode steps per run (default: 128)")
    parser.add_argument("--lifetime", type=int, default=43,
                        help="decode steps a churn row lives; rows/lifetime rows finish per step (default: 43)")
    parser.add_argument("--model", default=RANDOM,
                        help="a Hugging Face id or folder, or 'random' (default): a random-weight Llama of "
                             "--hidden and --layers with the default model's tokenizer")
    parser.add_argument("--hidden", type=int, default=384, help="random model's hidden size (default: 384)")
    parser.add_argument("--layers", type=int, default=4, help="random model's layers (default: 4)")
    parser.add_argument("--virtual-tokens", type=int, default=20, help="soft-prompt length, 0 for none (default: 20)")
    parser.add_argument("--tasks", type=int, default=8, help="distinct soft prompts (default: 8)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--mixed-steps", action=argparse.BooleanOptionalAction, default=True,
                        help="joiners are prefilled in the next decode step's forward where the paged kernel runs "
                             "(the server's default); --no-mixed-steps: in a prefill of their own after each step")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser


def _print_run(name: str, f: RunFigures) -> None:
    parts = " ".join(f"{part} {f.ms_per_step[part]:.2f}" for part in STEP_PARTS)
    print(f"  {name:<9} {f.decode_tokens_per_s:9.1f} decode tok/s  {f.tokens_per_s:9.1f} tok/s in all  {f.mean_rows:5.1f} rows x {f.mean_width:5.1f} columns/step  "
          f"{f.finished_per_step:.2f} finished/step  {f.seconds:6.2f} s")
    print(f"  {'':<9} ms/step: {parts} (emit runs inside prefill, decode and mixed)")


def main(argv: Seq[str] | None = None) -> int:
    """Prints the model, both runs, and the ratios; with --json, writes them too."""
    parser = build_parser()
    a = parser.parse_args(argv)
    for name, value in (("--rows", a.rows), ("--steps", a.steps), ("--lifetime", a.lifetime),
                        ("--hidden", a.hidden), ("--layers", a.layers), ("--tasks", a.tasks),
                        ("--threads", a.threads)):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    if a.virtual_tokens < 0:
        parser.error(f"--virtual-tokens must be at least 0, got {a.virtual_tokens}")
    if a.rows < a.lifetime:
        parser.error(f"--rows ({a.rows}) must be at least --lifetime ({a.lifetime}) for a row to finish every step")
    threads = torch.get_num_threads()
    torch.set_num_threads(a.threads)
    try:
        return _run(a, parser)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (a test) keeps its own setting


def _run(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Loads or builds the model, measures, prints."""
    device = torch.device(a.device)
    if a.model == RANDOM:
        try:
            base, shape = random_llama(a.hidden, a.layers, device)
        except ValueError as e:
            parser.error(str(e))
        print(f"model: random-weight Llama {json.dumps(shape)}")
    else:
        from softprompt.server.app.loading import load_base_model

        base = load_base_model(a.model, device=device)
        print(f"model: {a.model}")
    plan = Plan(rows=a.rows, steps=a.steps, lifetime=a.lifetime, virtual_tokens=a.virtual_tokens, tasks=a.tasks,
                mixed_steps=a.mixed_steps)
    print(f"device {device} ({base.dtype}), torch threads {torch.get_num_threads()}, {a.rows} rows, {a.steps} "
          f"timed steps after {WARMUP_STEPS} warm-up, churn rows live {a.lifetime} steps, inputs "
          f"{plan.min_input}-{plan.max_input} tokens, {a.virtual_tokens} virtual tokens on {a.tasks} tasks")
    figures = measure(base, plan)
    figures["threads"] = torch.get_num_threads()
    figures["device"] = str(device)
    _print_run("no churn", RunFigures(**figures["no_churn"]))
    _print_run("churn", RunFigures(**figures["churn"]))
    churn = RunFigures(**figures["churn"])
    apart = "with prefill time left out" if churn.ms_per_step["mixed"] == 0 else \
        "decode tokens only; the joiners' prefills run inside mixed steps, not apart"
    print(f"  churn / no churn: {figures['ratio']:.3f}x tok/s in all "
          f"({figures['ratio_without_prefill']:.3f}x {apart})")
    if a.json:
        with open(a.json, "w") as out:
            json.dump(figures, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
