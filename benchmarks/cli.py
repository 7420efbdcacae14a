"""The command line of `softprompt bench` (also `python -m softprompt.benchmarks.cli`): flags, then each method."""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from softprompt.benchmarks.measure import measure, progress
from softprompt.benchmarks.methods import METHODS
from softprompt.benchmarks.report import report
from softprompt.benchmarks.workload import Settings, build_workload, load_model


def _skip_keys(value: str) -> frozenset[str]:
    aliases = {name: key for key, (name, _) in METHODS.items()} | {key: key for key in METHODS}
    aliases |= {"sequential": "a", "batch": "b", "server": "e", "training": "f"}
    keys = set()
    for item in filter(None, (v.strip().lower() for v in value.split(","))):
        if item not in aliases:
            known = ", ".join(sorted(aliases))
            raise argparse.ArgumentTypeError(f"unknown method {item!r}: use letters a-i or {known}")
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
        description="Measure our engine and server (gRPC and HTTP) against HF generate and PEFT on one model and one "
                    "multi-task workload, in one process; prints generated tokens/s with ratios vs (a).\n\n"
                    + "\n".join(f"  ({k}) {label}" for k, (_, label) in METHODS.items()),
        epilog="examples:\n"
               "  softprompt bench                                    # defaults: 16 requests, 8 tasks\n"
               "  softprompt bench --requests 64 --clients 64 --skip peft --json out.json\n"
               "  softprompt bench --random-weights scripts/llama-3.2-1b-config.json --device cuda --new-tokens 128\n"
               "\nthe sampler alone (no model), microseconds per row per step:\n"
               "  python -m softprompt.benchmarks.sampling --rows 64 --vocab 49152 --steps 200\n"
               "\na batch mixing prefix-tuned, prompt-tuned and bare rows against the same rows all prompt-tuned:\n"
               "  python -m softprompt.benchmarks.mixed_methods --rows 16 --rounds 5\n",
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
    w.add_argument("--clients", type=_positive,
                   help="concurrent streaming clients for (e), (f) and (i) (default: --requests)")
    w.add_argument("--batch-size", type=_positive, default=64, help="our engine's max batch (default: 64)")
    w.add_argument("--fair-share", choices=("task", "token", "off"), default="task",
                   help="what the servers of (e), (f) and (i) share the batch between, as `softprompt serve "
                        "--fair-share` (default: task; off: arrival order, to measure what fair share costs)")
    m = parser.add_argument_group("model")
    m.add_argument("--model", help="Hugging Face id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    m.add_argument("--device", help="torch device, e.g. cpu, cuda (default: cuda if available)")
    m.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)")
    m.add_argument("--random-weights", type=Path, metavar="CONFIG_JSON",
                   help="random weights of this transformers config's shape; tokenizer from --model")
    m.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU, our engine replays decode steps from CUDA graphs captured at startup "
                        "(--no-cuda-graphs: eagerly, to measure what graphs buy)")
    m.add_argument("--packed-linears", action=argparse.BooleanOptionalAction, default=True,
                   help="on a CPU in float32, our engine runs linear layers on oneDNN-packed weights "
                        "(--no-packed-linears: the model's own kernels, to measure what packing buys)")
    m.add_argument("--paged-kernel", action=argparse.BooleanOptionalAction, default=True,
                   help="on a CPU in float32, our decode steps attend over the KV blocks in place "
                        "(--no-paged-kernel: gather them and run SDPA, to measure what the kernel buys)")
    m.add_argument("--mixed-steps", action=argparse.BooleanOptionalAction, default=True,
                   help="with the paged kernel, our engine prefills arriving requests in the decode step's forward "
                        "(--no-mixed-steps: in a forward of their own, to measure what mixing buys)")
    r = parser.add_argument_group("run")
    r.add_argument("--skip", type=_skip_keys, default=frozenset(), metavar="a,b,...",
                   help="methods to skip, by letter or name (e.g. --skip peft or --skip a,c)")
    r.add_argument("--json", type=Path, dest="json_out", metavar="OUT", help="also write every figure to this file")
    r.add_argument("--warmup", type=int, default=1, help="untimed short runs per method first (default: 1)")
    return parser


def parse_settings(argv: Sequence[str] | None) -> Settings:
    """Flags -> Settings."""
    a = build_parser().parse_args(argv)
    return Settings(
        requests=a.requests, tasks=a.tasks, virtual_tokens=a.virtual_tokens, new_tokens=a.new_tokens,
        input_tokens=a.input_tokens, data=a.data, clients=a.clients or a.requests, batch_size=a.batch_size,
        model=a.model, device=a.device, dtype=a.dtype, random_weights=a.random_weights, skip=a.skip,
        json_out=a.json_out, warmup=max(0, a.warmup), cuda_graphs=a.cuda_graphs,
        packed_linears=a.packed_linears, paged_kernel=a.paged_kernel, mixed_steps=a.mixed_steps,
        fair_share=a.fair_share,
    )


def _require_http_api() -> None:
    """Method (i) serves the OpenAI-compatible API: a missing package of it fails the run now, not after the
    methods before it (the GPU image has none of them)."""
    from softprompt.server.app.server import http_transport

    try:
        http_transport()
    except ModuleNotFoundError as exc:
        raise SystemExit(f"softprompt bench: method (i) needs {exc.name}, which the server extra installs "
                         "(pip install 'softprompt[server]'): install it, or --skip i") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `softprompt bench`; returns the exit status."""
    s = parse_settings(argv)
    if "i" not in s.skip:
        _require_http_api()
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


if __name__ == "__main__":
    raise SystemExit(main())
