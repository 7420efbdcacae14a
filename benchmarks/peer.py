"""`python -m softprompt.benchmarks.peer`: softprompt against vLLM on one soft-prompt workload, both over HTTP.

Both servers serve the same base model in float32 and are driven the same way: streamed OpenAI
`/v1/completions`, greedy, `--new-tokens` tokens at most, `--tasks` seeded random soft prompts of
`--virtual-tokens` rows (scaled like the model's own embeddings), requests round-robin over the tasks.

  softprompt  `softprompt serve` on a fresh prompt store; the prompts are registered through its gRPC
              API; a request is `{"model": <task>, "prompt": <text>}`.
  vLLM        the vLLM installed in another environment (`--vllm-python`, or `--vllm` for its CLI),
              `--enable-prompt-embeds`; vLLM has no soft prompts of its own since prompt adapters were
              removed, so this client sends, per request, `prompt_embeds` = base64 of `torch.save` of
              `[prompt ; embed(input_ids)]` (the embedding table of the same weights, float32), no `prompt`.
              The input ids are what softprompt's `/v1/completions` makes of the text (`tokenizer(text)`).
              vLLM needs `model.embed_tokens.weight` in the checkpoint; the default model's converted
              cache keeps the tied table only as `lm_head.weight`, so a vLLM-ready copy is written once
              (transformers' `save_pretrained`, float32, with the tokenizer) under the cache directory.

Servers run one at a time, each on free loopback ports, started, warmed up (`--warmup` bursts of one
short request per task, not timed), measured on every scenario in turn (`--scenario STREAMS:REQUESTS`;
default 16:64 then 64:128), then stopped. With `--runs N` the order alternates (softprompt first in
odd runs, vLLM first in even ones) and the report gives medians. No input text is used twice in a run, so
no request reuses another's through vLLM's prefix cache beyond the soft prompt; every run repeats them.

Figures per server and scenario: generated tokens/s (completion tokens the stream reported / wall
time of the scenario), TTFT p50/p99 (send to the first streamed choice), latency p50/p99 (send to the
stream's end), requests that stopped before `--new-tokens` (end of sequence), the cores the server's
process tree used and the cores other processes used meanwhile (from /proc; well above 0 means a busy
machine); then softprompt/vLLM ratios and how many outputs are identical (the same streamed text).

Every request should make exactly `--new-tokens` tokens on both servers, but softprompt's HTTP API
refuses vLLM's `ignore_eos` and `min_tokens`, so both servers stop at end of sequence and each is
credited with the tokens it actually produced (identical outputs mean identical work).

Run time on a 2-core CPU with the defaults: about 3.5 minutes a run, 7.3 min measured for `--runs 2`
(vLLM's start 75-95 s, as it recompiles its model every time; its two scenarios ~65 s; softprompt's start
~6 s, its scenarios ~55 s; the vLLM-ready model copy, once, ~5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from softprompt.benchmarks.results import percentile
# Also re-exported for callers of this module: the workload's bodies and names, the report's table and comparison.
from softprompt.benchmarks.peer_workload import (
    DEFAULT_VLLM_ENV, DEFAULT_VLLM_PYTHON, Plan, Request, SOFTPROMPT, Scenario, VLLM, WARMUP_TOKENS, Workload,
    build_workload, softprompt_body, task_name, vllm_body,
)
from softprompt.benchmarks.peer_servers import (
    CpuReading, Peer, Reply, Running, SoftpromptPeer, VllmPeer, cpu_use, drive, progress, vllm_model_dir,
)
from softprompt.benchmarks.peer_report import Figures, compare, report, table_lines  # noqa: F401


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def summarize(server: str, scenario: int, run: int, replies: Sequence[Reply], wall: float, new_tokens: int,
              cpu: tuple[float | None, float | None], hit_rate: float | None = None) -> Figures:
    """The figures of one timed scenario from its replies."""
    tokens = sum(r.tokens for r in replies)
    ttfts, latencies = [r.ttft_s for r in replies], [r.latency_s for r in replies]
    return Figures(
        server=server, scenario=scenario, run=run, wall_s=wall, tokens=tokens, tokens_per_s=tokens / wall,
        ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99),
        latency_p50_s=percentile(latencies, 50), latency_p99_s=percentile(latencies, 99),
        stopped_early=sum(r.tokens < new_tokens for r in replies), server_cores=cpu[0], other_cores=cpu[1],
        prefix_cache_hit_rate=hit_rate,
        texts=[r.text for r in replies], finish_reasons=[r.finish_reason for r in replies],
        counts=[r.tokens for r in replies],
    )


def encode_bodies(peer: Peer, requests: Sequence[Request], new_tokens: int) -> list[bytes]:
    """Every request's body, serialized before the clock starts (building embeddings is not the server's time)."""
    return [json.dumps(peer.body(r, new_tokens)).encode() for r in requests]


def measure_peer(peer: Peer, work: Workload, plan: Plan, run: int, folder: Path) -> tuple[list[Figures], Running]:
    """Starts one server, warms it up, times every scenario on it, stops it."""
    figures = []
    folder = folder / f"run-{run + 1}"  # each run's logs and store apart
    folder.mkdir(parents=True, exist_ok=True)
    with peer.serve(folder) as running:
        warm = encode_bodies(peer, work.warmup, WARMUP_TOKENS)
        for i in range(plan.warmup):
            progress(f"{peer.name}: warm-up {i + 1}/{plan.warmup} ({len(warm)} requests, not timed)")
            drive(running.port, warm, len(warm))
        for k, (scenario, requests) in enumerate(zip(plan.scenarios, work.scenarios)):
            bodies = encode_bodies(peer, requests, plan.new_tokens)
            progress(f"{peer.name}: run {run + 1}, {scenario.label}")
            cache0, before = peer.prefix_cache_counters(running), CpuReading.now(running.pid)
            replies, wall = drive(running.port, bodies, scenario.streams)
            cpu = cpu_use(before, CpuReading.now(running.pid), wall)
            f = summarize(peer.name, k, run, replies, wall, plan.new_tokens, cpu,
                          hit_rate(cache0, peer.prefix_cache_counters(running)))
            progress(f"{peer.name}: {f.tokens_per_s:.1f} tok/s ({f.tokens} tokens in {wall:.1f} s), "
                     f"TTFT p50 {f.ttft_p50_s * 1e3:.0f} ms")
            figures.append(f)
    return figures, running


def hit_rate(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    """Prefix-cache hits over queries between two counter readings; None without counters or queries."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def run_all(peers: Sequence[Peer], work: Workload, plan: Plan, folder: Path) -> tuple[list[Figures], dict[str, Any]]:
    """Every run: each server in turn (alternating the order between runs), never two at once."""
    figures: list[Figures] = []
    servers: dict[str, Any] = {}
    for run in range(plan.runs):
        order = list(peers) if run % 2 == 0 else list(peers)[::-1]
        for peer in order:
            done, running = measure_peer(peer, work, plan, run, folder)
            figures.extend(done)
            servers.setdefault(peer.name, {**running.info, "start_s": []})["start_s"].append(running.start_s)
    return figures, servers


# ---------------------------------------------------------------------------------------------------------------
# The command line


def _scenario(value: str) -> Scenario:
    try:
        streams, requests = (int(v) for v in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STREAMS:REQUESTS, e.g. 16:64, got {value!r}") from None
    if streams < 1 or requests < 1:
        raise argparse.ArgumentTypeError(f"streams and requests must be at least 1, got {value!r}")
    return Scenario(streams, requests)


def _env(value: str) -> tuple[str, str]:
    name, sep, setting = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name, setting


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    d = Plan()
    p = argparse.ArgumentParser(
        prog="python -m softprompt.benchmarks.peer", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m softprompt.benchmarks.peer --json peer.json            # both scenarios, both servers\n"
               "  python -m softprompt.benchmarks.peer --runs 2 --json peer.json   # alternate the order, medians\n"
               "  python -m softprompt.benchmarks.peer --skip-vllm --scenario 16:64\n"
               "  python -m softprompt.benchmarks.peer --vllm ~/vllm-env/bin/vllm   # a vllm CLI that works\n")
    w = p.add_argument_group("workload")
    w.add_argument("--scenario", type=_scenario, action="append", dest="scenarios", metavar="STREAMS:REQUESTS",
                   help="a timed phase: concurrent streams and requests; repeat for several "
                        "(default: " + " and ".join(f"{s.streams}:{s.requests}" for s in d.scenarios) + ")")
    w.add_argument("--tasks", type=_positive, default=d.tasks, help=f"distinct soft prompts (default: {d.tasks})")
    w.add_argument("--virtual-tokens", type=_positive, default=d.virtual_tokens,
                   help=f"rows per soft prompt (default: {d.virtual_tokens})")
    w.add_argument("--new-tokens", type=_positive, default=d.new_tokens,
                   help=f"max_tokens of every request (default: {d.new_tokens})")
    w.add_argument("--input-tokens", type=_positive, default=d.input_tokens,
                   help=f"about how many tokens each input has (default: {d.input_tokens})")
    w.add_argument("--model", help="Hugging Face id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    r = p.add_argument_group("run")
    r.add_argument("--runs", type=_positive, default=d.runs,
                   help="runs, alternating which server goes first; the report gives medians (default: 1)")
    r.add_argument("--warmup", type=int, default=d.warmup,
                   help=f"untimed bursts of one {WARMUP_TOKENS}-token request per task before timing each server "
                        f"(default: {d.warmup})")
    r.add_argument("--max-batch-size", type=_positive, default=d.max_batch_size,
                   help="softprompt's --max-batch-size and vLLM's --max-num-seqs (default: 64)")
    r.add_argument("--json", type=Path, dest="json_out", metavar="OUT", help="also write every figure to this file")
    r.add_argument("--work-dir", type=Path, help="where server logs and the store go (default: a temporary folder, "
                                                 "removed at the end)")
    s = p.add_argument_group("servers")
    s.add_argument("--skip-vllm", action="store_true", help="run softprompt alone (no ratio, no agreement)")
    s.add_argument("--vllm-python", default=os.environ.get("SOFTPROMPT_VLLM_PYTHON", DEFAULT_VLLM_PYTHON),
                   help="python of the environment vLLM is installed in; runs `-m vllm.entrypoints.openai.api_server` "
                        "(default: $SOFTPROMPT_VLLM_PYTHON or " + DEFAULT_VLLM_PYTHON + ")")
    s.add_argument("--vllm", metavar="PATH", help="run vLLM's own CLI (`PATH serve ...`) instead of --vllm-python")
    s.add_argument("--vllm-url", metavar="URL",
                   help="use a vLLM already serving on loopback (http://127.0.0.1:PORT, started with "
                        "--enable-prompt-embeds on this model in float32) instead of starting one")
    s.add_argument("--vllm-env", type=_env, action="append", default=[], metavar="NAME=VALUE",
                   help="environment for vLLM, repeatable (default: VLLM_CPU_KVCACHE_SPACE=2, i.e. GiB, as "
                        "softprompt's CPU default; e.g. VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0)")
    s.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for vLLM's server, repeatable (e.g. --vllm-arg=--enforce-eager)")
    s.add_argument("--softprompt-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for `softprompt serve`, repeatable (e.g. --softprompt-arg=--batch-wait-ms=1)")
    return p


def _url_port(url: str) -> int:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost") or parsed.port is None:
        raise SystemExit(f"--vllm-url must be http://127.0.0.1:PORT, got {url!r}")
    return parsed.port


def make_peers(a: argparse.Namespace, plan: Plan, work: Workload, model_dir: Path | None) -> list[Peer]:
    """softprompt, and vLLM unless skipped."""
    peers: list[Peer] = [SoftpromptPeer(work, a.model, plan.max_batch_size, a.softprompt_arg)]
    if a.skip_vllm:
        return peers
    if a.vllm is None and a.vllm_url is None and not Path(a.vllm_python).is_file():
        raise SystemExit(f"no vLLM python at {a.vllm_python}: pass --vllm-python, --vllm or --vllm-url, or --skip-vllm")
    needed = plan.virtual_tokens + max(len(r.input_ids) for rs in work.scenarios for r in rs) + plan.new_tokens
    peers.append(VllmPeer(
        workload=work, model_dir=model_dir, python=a.vllm_python, cli=a.vllm, max_batch_size=plan.max_batch_size,
        max_model_len=max(512, needed), env={**DEFAULT_VLLM_ENV, **dict(a.vllm_env)}, extra_args=a.vllm_arg,
        url_port=_url_port(a.vllm_url) if a.vllm_url else None))
    return peers


def prepare(a: argparse.Namespace, plan: Plan) -> tuple[Workload, Path | None, str]:
    """Loads the model once: the workload, the vLLM-ready folder (when vLLM is started here) and the model's id."""
    from softprompt.server.app.loading import load_base_model, resolve_model_path
    from softprompt.server.config import default_cache_dir

    progress("loading the model (for the prompts, the embedding table and the tokenizer)")
    base = load_base_model(a.model, device="cpu", dtype="float32")
    work = build_workload(base.model, base.tokenizer, plan)
    model_dir = None
    if not a.skip_vllm and a.vllm_url is None:
        source, _ = resolve_model_path(a.model, default_cache_dir())
        model_dir = vllm_model_dir(base.model, base.tokenizer, source, default_cache_dir())
    return work, model_dir, base.spec.model_id


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    a = build_parser().parse_args(argv)
    d = Plan()
    plan = Plan(scenarios=tuple(a.scenarios or d.scenarios), tasks=a.tasks, virtual_tokens=a.virtual_tokens,
                new_tokens=a.new_tokens, input_tokens=a.input_tokens, runs=a.runs, warmup=max(0, a.warmup),
                max_batch_size=a.max_batch_size)
    work, model_dir, model_id = prepare(a, plan)
    peers = make_peers(a, plan, work, model_dir)
    with tempfile.TemporaryDirectory(prefix="softprompt-peer-") as tmp:
        folder = a.work_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        figures, servers = run_all(peers, work, plan, folder)
    out = report(plan, work, figures, servers, model_id)
    if a.json_out is not None:
        a.json_out.write_text(json.dumps(out, indent=2) + "\n")
        progress(f"wrote {a.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
