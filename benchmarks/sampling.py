"""`python -m softprompt.benchmarks.sampling`: the sampler alone, in microseconds per row per step.

Times `RowSampler` on random float32 logits [rows, vocab] (by default 64 rows over the default model's
49152-token vocabulary), one configuration at a time, every row alike: each step samples a token per
row and reads the tokens back with `.tolist()`, as the engine does, which also waits for the device.
No model is loaded.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from softprompt.prompts.options import DecodingOptions
from softprompt.server.core.sampling import RowSampler, seeded_generator, unseeded_generator

# name -> every row's parameters (seeded rows get seeds 0, 1, ...)
CONFIGS: dict[str, DecodingOptions] = {
    "greedy": DecodingOptions(),
    "temperature": DecodingOptions(temperature=0.8),
    "top-k": DecodingOptions(temperature=0.8, top_k=50),
    "top-p": DecodingOptions(temperature=0.8, top_p=0.9),
    "top-k+top-p": DecodingOptions(temperature=0.8, top_k=50, top_p=0.9),
}


def time_config(params: DecodingOptions, *, rows: int, vocab: int, steps: int, seeded: bool,
                device: torch.device) -> float:
    """Seconds per step of sampling `rows` rows alike (the best of three runs of `steps` steps)."""
    rows_params = [DecodingOptions(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                  seed=i if seeded else None) for i in range(rows)]
    sample = RowSampler(rows_params, [seeded_generator(p, device) for p in rows_params], unseeded_generator(device),
                        device)
    g = torch.Generator().manual_seed(0)
    # A few different logits, cycled, so that no step sees the same numbers as the one before.
    logits = [(torch.randn(rows, vocab, generator=g) * 3).to(device) for _ in range(4)]
    for x in logits:
        sample(x).tolist()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for step in range(steps):
            sample(logits[step % len(logits)]).tolist()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m softprompt.benchmarks.sampling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="rows per step (default: 64)")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size (default: 49152)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per run (default: 200)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--config", choices=sorted(CONFIGS), action="append",
                        help="configurations to time, repeatable (default: all)")
    parser.add_argument("--seeded", action="store_true", help="give every row its own seed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Prints one line per configuration: milliseconds per step and microseconds per row per step."""
    parser = build_parser()
    a = parser.parse_args(argv)
    for name, value in (("--rows", a.rows), ("--vocab", a.vocab), ("--steps", a.steps)):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    device = torch.device(a.device)
    print(f"sampling {a.rows} rows x {a.vocab} vocab on {device}, {a.steps} steps, "
          f"{'seeded' if a.seeded else 'unseeded'} rows")
    for name in a.config or CONFIGS:
        seconds = time_config(CONFIGS[name], rows=a.rows, vocab=a.vocab, steps=a.steps, seeded=a.seeded,
                              device=device)
        print(f"  {name:<12} {seconds * 1e3:9.3f} ms/step {seconds / a.rows * 1e6:9.1f} us/row/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
