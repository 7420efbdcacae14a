"""`python -m softprompt.benchmarks.mixed_methods`: a batch mixing prompt-learning methods against prompt tuning only.

Issue 21's bar: rows of prefix-tuned tasks (their keys and values written straight into the rows' KV blocks),
prompt-tuned tasks and the bare model share one batch at the rate of the same rows all prompt-tuned (>= 0.95x).

Both arms serve the same rows: the same inputs, the same `--new-tokens` each (end of sequence ignored), the
same `--virtual-tokens` positions in front of every row that has a prompt, the same rows without one (every
`--bare-every`-th). Only what the prompted rows' positions are differs: in the "prompt" arm every task is
prompt-tuned; in the "mixed" arm the even tasks are prefix-tuned (PREFIX_TUNING keys and values, as
registered) and the odd ones prompt-tuned. Every version is registered in a temporary store and each round
resolves every row through admission (the registry, the prompt cache, `KvPrefix` views), then runs the
engine: one prefill of all rows (prompt-tuned rows over their cached prefixes, warmed before timing) and
decode steps until every row is done. Arms alternate for `--rounds` rounds; the figure is generated tokens
per second, the median over rounds, and the ratio of the medians (also each round's own ratio).

    python -m softprompt.benchmarks.mixed_methods                       # the default model, 16 rows
    python -m softprompt.benchmarks.mixed_methods --rows 32 --rounds 7 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch

from softprompt.benchmarks.workload import build_texts, make_prompts
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.methods.prefix_tuning import initial_prefix
from softprompt.prompts.options import DecodingOptions
from softprompt.prompts.registry import Registry

ARMS = ("prompt", "mixed")


def _prefixes(base: Any, tasks: int, virtual_tokens: int) -> list[torch.Tensor]:
    """Seeded KV prefixes at real magnitudes: the keys and values the model computes for random tokens, plus noise."""
    layout = base.spec.kv_layout
    g = torch.Generator().manual_seed(21)
    vocab = base.model.get_input_embeddings().weight.shape[0]
    out = []
    for _ in range(tasks):
        kv = initial_prefix(base.model, torch.randint(vocab, (virtual_tokens,), generator=g).tolist(), layout)
        out.append(kv + torch.randn(kv.shape, generator=g) * kv.std() * 0.25)
    return out


def register_tasks(base: Any, registry: Registry, tasks: int, virtual_tokens: int) -> dict[str, list[str]]:
    """Each arm's task refs: "prompt" all prompt-tuned; "mixed" prefix-tuned (even) and prompt-tuned (odd)."""
    embeddings = make_prompts(base.model, tasks, virtual_tokens, torch.float32)
    prefixes = _prefixes(base, tasks, virtual_tokens)
    layout = base.spec.kv_layout
    refs: dict[str, list[str]] = {arm: [] for arm in ARMS}
    for task in range(tasks):
        prompt = PromptTensor(embeddings[task].float().cpu(), "PROMPT_TUNING")
        refs["prompt"].append(registry.register(f"pt-{task}", prompt, base.spec).ref)
        if task % 2 == 0:
            prefix = PromptTensor(prefixes[task], "PREFIX_TUNING", layout=layout)
            refs["mixed"].append(registry.register(f"prefix-{task}", prefix, base.spec).ref)
        else:
            refs["mixed"].append(refs["prompt"][-1])
    return refs


def _rows(app: Any, refs: list[str], texts: list[str], new_tokens: int, bare_every: int) -> list[Any]:
    from softprompt.server.core.engine import Sequence

    admission, engine = app.admission, app.admission.engine
    rows = []
    for i, text in enumerate(texts):
        ref = "" if bare_every and i % bare_every == bare_every - 1 else refs[i % len(refs)]
        prompt, _, key = admission.resolve(ref)
        seq = Sequence(request_id=i, input_ids=engine.tokenizer(text).input_ids,
                       params=DecodingOptions(max_new_tokens=new_tokens), prompt=prompt, prompt_key=key)
        engine.start(seq)
        rows.append(seq)
    return rows


@dataclass(frozen=True)
class Pass:
    """One timed pass of an arm."""

    seconds: float
    tokens: int  # generated, all rows
    prefix_rows: int  # rows behind keys and values (a prefix-tuned task)
    prompt_rows: int  # rows behind virtual-token embeddings


def run_arm(app: Any, refs: list[str], texts: list[str], new_tokens: int, bare_every: int) -> Pass:
    """One timed pass: resolve every row, prefill them together, decode until all are done."""
    from softprompt.server.core.virtual import KvPrefix

    engine = app.admission.engine
    start = time.perf_counter()
    rows = _rows(app, refs, texts, new_tokens, bare_every)
    batch, _ = engine.prefill(rows)
    while batch is not None:
        engine.decode(batch)
        batch = engine.filter(batch, [i for i, s in enumerate(batch.sequences) if s.finish_reason is None])
    seconds = time.perf_counter() - start
    prefix = sum(isinstance(s.prompt, KvPrefix) for s in rows)
    return Pass(seconds, sum(len(s.generated) for s in rows), prefix,
                sum(s.prompt is not None for s in rows) - prefix)


def main(argv: Seq[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m softprompt.benchmarks.mixed_methods",
                                     description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the server's)")
    parser.add_argument("--rows", type=int, default=16, help="rows in the batch (default: 16)")
    parser.add_argument("--tasks", type=int, default=8, help="tasks, round-robin over rows (default: 8)")
    parser.add_argument("--virtual-tokens", type=int, default=20, help="positions of each prompt (default: 20)")
    parser.add_argument("--input-tokens", type=int, default=32, help="approximate input length (default: 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row (default: 32)")
    parser.add_argument("--bare-every", type=int, default=4,
                        help="every N-th row has no prompt, in both arms (default: 4; 0: none)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per arm, alternating (default: 5)")
    parser.add_argument("--json", type=Path, dest="json_out", help="also write the figures here")
    a = parser.parse_args(argv)

    from softprompt.server.app.loading import load_base_model
    from softprompt.server.app.server import build_app
    from softprompt.server.config import ServerConfig

    base = load_base_model(a.model, device=a.device, dtype=a.dtype)
    texts = build_texts(base.tokenizer, a.rows, a.input_tokens, None)
    with tempfile.TemporaryDirectory(prefix="softprompt-mixed-") as store:
        app = build_app(ServerConfig(port=0, store=Path(store), http_port=None, max_batch_size=a.rows), base=base)
        app.admission.engine.ignore_eos = True
        refs = register_tasks(base, app.registry, a.tasks, a.virtual_tokens)
        for arm in ARMS:  # untimed: loads every prompt and computes the prompt-tuned prefixes
            run_arm(app, refs[arm], texts, 2, a.bare_every)
        rates: dict[str, list[float]] = {arm: [] for arm in ARMS}
        rows: dict[str, dict[str, int]] = {}
        for round_ in range(a.rounds):
            for arm in (ARMS if round_ % 2 == 0 else ARMS[::-1]):
                done = run_arm(app, refs[arm], texts, a.new_tokens, a.bare_every)
                rates[arm].append(done.tokens / done.seconds)
                rows[arm] = {"tokens": done.tokens, "prefix_rows": done.prefix_rows, "prompt_rows": done.prompt_rows}
    if rows["mixed"]["tokens"] != rows["prompt"]["tokens"]:
        raise SystemExit(f"the arms generated different numbers of tokens ({rows}): their rates do not compare")
    median = {arm: statistics.median(r) for arm, r in rates.items()}
    ratio = median["mixed"] / median["prompt"]
    per_round = [m / p for m, p in zip(rates["mixed"], rates["prompt"])]
    print(f"{a.rows} rows ({a.tasks} tasks, every {a.bare_every or 'no'}-th row bare), {a.virtual_tokens} virtual "
          f"tokens, ~{a.input_tokens} input + {a.new_tokens} new tokens each, {base.device} {base.dtype}, "
          f"torch threads {torch.get_num_threads()}")
    for arm in ARMS:
        shown = ", ".join(f"{r:.1f}" for r in rates[arm])
        print(f"  {arm:>6}: {median[arm]:7.1f} generated tokens/s (median of {a.rounds}: {shown}); "
              f"{rows[arm]['prefix_rows']} prefix-tuned, {rows[arm]['prompt_rows']} prompt-tuned rows")
    print(f"  mixed / prompt only: {ratio:.3f}x (rounds: {', '.join(f'{r:.3f}' for r in per_round)})")
    if a.json_out is not None:
        a.json_out.write_text(json.dumps({"settings": vars(a) | {"json_out": str(a.json_out)}, "rates": rates,
                                          "median": median, "ratio": ratio, "per_round": per_round, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
