"""`python -m softprompt.benchmarks.long_prompt`: how long prompts arriving delay running streams.

Issue 12's "long prompt" measure: 16 short streams decode while `--long` prompts of `--long-tokens`
tokens arrive `--every` seconds apart; the figure is the time between two tokens of the short
streams (p50, p90, p95, p99, max). Two runs in one process on the same model:

  whole     the prefill budget holds a whole long prompt: each is prefilled in one forward while
            every stream waits (what the server did before chunked prefill);
  chunked   `--max-prefill-tokens` positions per step (the server's behaviour): a long prompt is
            prefilled in chunks, one between two decode steps.

The server runs in-process (admission, scheduler, engine; no gRPC), greedy, with end-of-sequence
ignored so every stream makes exactly `--new-tokens`. By default the model has random weights
(a Llama shaped like the default model but smaller, printed), so both runs take about a minute on
a 2-core CPU. Timing figures: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from softprompt.benchmarks.churn import random_llama
from softprompt.benchmarks.results import percentile
from softprompt.server.core.model import BaseModel

WORDS = ("the quick brown fox jumps over a lazy dog while soft prompts steer one frozen model through many "
         "tasks at once").split()
QUANTILES = (50, 90, 95, 99)


def text_of(base: BaseModel, tokens: int, offset: int) -> str:
    """About `tokens` tokens of text (distinct per `offset`, so no two requests share a prefix)."""
    words = [WORDS[(offset + 7 * i) % len(WORDS)] for i in range(tokens * 2)]
    ids = base.tokenizer(" ".join(words), add_special_tokens=False).input_ids[:tokens]
    return base.tokenizer.decode(ids)


def run(base: BaseModel, args: argparse.Namespace, budget: int) -> dict[str, Any]:
    """One run at prefill budget `budget`: the short streams' gaps between tokens, in ms."""
    from softprompt.server.app.server import build_app
    from softprompt.server.config import ServerConfig
    from softprompt.prompts.options import DecodingOptions
    from softprompt.server.core.types import GenerationRequest

    with tempfile.TemporaryDirectory(prefix="softprompt-long-") as store:
        config = ServerConfig(port=0, store=Path(store), max_batch_size=32, max_prefill_tokens=budget,
                              max_input_tokens=max(2048, args.long_tokens), kv_cache_memory="2GiB",
                              mixed_steps=args.mixed_steps)
        app = build_app(config, base=base)
        app.scheduler.engine.ignore_eos = True
        admit = app.admission.admit
        streams = [app.scheduler.submit(admit(GenerationRequest("", text_of(base, 24, i),
                                                                  DecodingOptions(max_new_tokens=args.new_tokens))))
                   for i in range(args.streams)]
        times: list[list[float]] = [[] for _ in streams]

        def read(i: int) -> None:
            for _ in streams[i].chunks():
                times[i].append(time.perf_counter())

        readers = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
        app.scheduler.start()
        for t in readers:
            t.start()
        while not all(times):  # the streams are decoding before the first long prompt arrives
            time.sleep(0.01)
        longs = []
        for k in range(args.long):
            time.sleep(args.every)
            request = GenerationRequest("", text_of(base, args.long_tokens, 1000 + k), DecodingOptions(max_new_tokens=4))
            longs.append(app.scheduler.submit(admit(request)))
        for t in readers:
            t.join()
        for handle in longs:
            handle.result()
        app.scheduler.close()
    gaps = [1e3 * (b - a) for ts in times for a, b in zip(ts, ts[1:])]
    figures = {f"p{q}": percentile(gaps, q) for q in QUANTILES}
    return {"budget": budget, **figures, "max": max(gaps), "gaps": len(gaps),
            "prefill_chunks": app.scheduler.stats.prefill_chunks}


def main(argv: list[str] | None = None) -> None:
    """Both runs, printed (and written with --json)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16, help="short streams decoding throughout")
    parser.add_argument("--new-tokens", type=int, default=160, help="tokens each short stream makes")
    parser.add_argument("--long", type=int, default=3, help="long prompts arriving")
    parser.add_argument("--long-tokens", type=int, default=2000, help="tokens per long prompt")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between two long prompts")
    parser.add_argument("--max-prefill-tokens", type=int, default=256, help="the chunked run's prefill budget")
    parser.add_argument("--hidden", type=int, default=576, help="random model width (a multiple of 192)")
    parser.add_argument("--layers", type=int, default=8, help="random model layers")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--mixed-steps", action=argparse.BooleanOptionalAction, default=True,
                        help="chunks run in the decode step's forward where the paged kernel runs (the server's "
                             "default); --no-mixed-steps: in a forward of their own, to measure what mixing buys")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base, shape = random_llama(args.hidden, args.layers, torch.device("cpu"))
    print(f"model: random-weight Llama {json.dumps(shape)}; {args.streams} streams x {args.new_tokens} tokens, "
          f"{args.long} prompts of {args.long_tokens} tokens {args.every} s apart, torch threads {args.threads}, "
          f"mixed steps {'on' if args.mixed_steps else 'off'}")
    results = {}
    for name, budget in (("whole", args.long_tokens + 64), ("chunked", args.max_prefill_tokens)):
        r = results[name] = run(base, args, budget)
        print(f"  {name:8} budget {budget:5}: " + "  ".join(f"p{q} {r[f'p{q}']:7.1f} ms" for q in QUANTILES)
              + f"  max {r['max']:7.1f} ms  ({r['gaps']} gaps, {r['prefill_chunks']} prefill chunks)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
