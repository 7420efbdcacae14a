"""The peer benchmark's figures and report: medians, agreement between servers, the table (see `peer`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from softprompt.benchmarks.peer_workload import Plan, SOFTPROMPT, VLLM, Workload



@dataclass
class Figures:
    """One server's timed run of one scenario."""

    server: str
    scenario: int  # index into Plan.scenarios
    run: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    latency_p50_s: float
    latency_p99_s: float
    stopped_early: int  # requests that ended before --new-tokens (end of sequence)
    server_cores: float | None
    other_cores: float | None
    prefix_cache_hit_rate: float | None  # share of the prompt tokens the server's prefix cache served (vLLM only)
    texts: list[str]
    finish_reasons: list[str | None]
    counts: list[int]


# ---------------------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class Agreement:
    """How many outputs of two servers are identical, over the requests of one scenario and run."""

    identical: int
    total: int
    same_finish: int  # requests whose finish reasons agree
    first_difference: int | None  # index of the first request whose texts differ


def agreement(a: Figures, b: Figures) -> Agreement:
    """Text-by-text comparison of two servers' replies to the same requests."""
    pairs = list(zip(a.texts, b.texts))
    differ = [i for i, (x, y) in enumerate(pairs) if x != y]
    return Agreement(identical=len(pairs) - len(differ), total=len(pairs),
                     same_finish=sum(x == y for x, y in zip(a.finish_reasons, b.finish_reasons)),
                     first_difference=differ[0] if differ else None)


def median_of(figures: Sequence[Figures], name: str) -> float | None:
    """The median of one field over runs (None when any run lacks it)."""
    values = [getattr(f, name) for f in figures]
    return None if any(v is None for v in values) else statistics.median(values)


SUMMARY_FIELDS = ("tokens_per_s", "tokens", "wall_s", "ttft_p50_s", "ttft_p99_s", "latency_p50_s", "latency_p99_s",
                  "stopped_early", "server_cores", "other_cores", "prefix_cache_hit_rate")


def summary(figures: Sequence[Figures], server: str, scenario: int) -> dict[str, Any] | None:
    """One server's medians over runs on one scenario, with each run's tokens/s."""
    mine = [f for f in figures if f.server == server and f.scenario == scenario]
    if not mine:
        return None
    out: dict[str, Any] = {name: median_of(mine, name) for name in SUMMARY_FIELDS}
    out["runs_tokens_per_s"] = [f.tokens_per_s for f in mine]
    return out


def compare(figures: Sequence[Figures], scenario: int) -> dict[str, Any] | None:
    """softprompt against vLLM on one scenario: ratios of the medians, and output agreement in every run."""
    ours, theirs = summary(figures, SOFTPROMPT, scenario), summary(figures, VLLM, scenario)
    if ours is None or theirs is None:
        return None
    runs = sorted({f.run for f in figures if f.scenario == scenario})
    by = {(f.server, f.run): f for f in figures if f.scenario == scenario}
    agree = [agreement(by[(SOFTPROMPT, r)], by[(VLLM, r)]) for r in runs if (SOFTPROMPT, r) in by and (VLLM, r) in by]
    return {
        "tokens_per_s_ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "ttft_p50_ratio": ours["ttft_p50_s"] / theirs["ttft_p50_s"],
        "latency_p50_ratio": ours["latency_p50_s"] / theirs["latency_p50_s"],
        "agreement": [asdict(a) for a in agree],
    }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.0f} ms"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table_lines(plan: Plan, figures: Sequence[Figures]) -> list[str]:
    """The results table: per scenario, a row per server, then the ratio and agreement line."""
    header = ["scenario", "server", "tok/s", "tokens", "TTFT p50", "TTFT p99", "latency p50", "latency p99",
              "stopped early", "prefix cache hits", "server cores", "others' cores"]
    rows: list[list[str]] = [header]
    notes: list[str] = []
    for k, scenario in enumerate(plan.scenarios):
        for server in (SOFTPROMPT, VLLM):
            s = summary(figures, server, k)
            if s is None:
                continue
            rows.append([scenario.label, server, f"{s['tokens_per_s']:.1f}", f"{s['tokens']:.0f}",
                         _ms(s["ttft_p50_s"]), _ms(s["ttft_p99_s"]), _ms(s["latency_p50_s"]), _ms(s["latency_p99_s"]),
                         f"{s['stopped_early']:.0f}/{scenario.requests}", _share(s["prefix_cache_hit_rate"]),
                         _cores(s["server_cores"]),
                         _cores(s["other_cores"])])
            if plan.runs > 1:
                notes.append(f"{scenario.label}, {server}: tok/s per run "
                             + ", ".join(f"{v:.1f}" for v in s["runs_tokens_per_s"]))
        c = compare(figures, k)
        if c is not None:
            same = ", ".join(f"{a['identical']}/{a['total']}" for a in c["agreement"])
            notes.append(f"{scenario.label}: softprompt/vLLM {c['tokens_per_s_ratio']:.2f}x tok/s, TTFT p50 "
                         f"{c['ttft_p50_ratio']:.2f}x, latency p50 {c['latency_p50_ratio']:.2f}x; outputs identical "
                         f"(same text) {same}" + (" (per run)" if len(c["agreement"]) > 1 else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join([row[0].ljust(widths[0]), row[1].ljust(widths[1])]
                               + [c.rjust(w) for c, w in zip(row[2:], widths[2:])]))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return [*lines, "", *notes]


NOTES = (
    "tok/s = completion tokens the streams reported / the scenario's wall time (all requests start together, "
    "each client sends its next request when the previous one ends); medians over runs.",
    "TTFT = send to the first streamed choice; latency = send to the end of the stream; p50/p99 over requests.",
    "softprompt's /v1/completions refuses ignore_eos and min_tokens, so both servers stop at end of sequence: "
    "'stopped early' counts requests that ended before --new-tokens; with identical outputs both did the same work.",
    "server cores / others' cores: CPU cores the server's processes / every other process except this client "
    "kept busy on average during the scenario (/proc); others well above 0 means a busy, noisier machine. "
    "vLLM's CPU backend runs its model on one bound core and keeps the other for its front end by default; "
    "softprompt's torch uses every core.",
    "vLLM gets each request as prompt_embeds = [soft prompt ; embedding of softprompt's input ids], float32, "
    "built and serialized before the clock starts. 'prefix cache hits' is vLLM's share of prompt tokens served "
    "from its prefix cache (/metrics): it caches whole blocks only (128 tokens by default on a CPU), so a shorter "
    "soft prompt is recomputed for every request, while softprompt computes each prompt version's prefix KV once.",
)


def report(plan: Plan, work: Workload, figures: Sequence[Figures], servers: dict[str, Any],
           model: str) -> dict[str, Any]:
    """Prints the header, the table, the ratios and the notes; returns everything JSON-ready."""
    from softprompt.benchmarks.report import machine_info

    machine = machine_info(torch.device("cpu"))
    lengths = [len(r.input_ids) for requests in work.scenarios for r in requests]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, GPU none; {machine['platform']}")
    for name, info in servers.items():
        starts = ", ".join(f"{s:.0f} s" for s in info["start_s"] if s is not None) or "-"
        source = f" ({info['source']})" if info.get("source") else ""
        print(f"{name}: version {info.get('version') or '?'}{source}; started in {starts}")
    print(f"workload: {model}, float32; {plan.tasks} tasks x {plan.virtual_tokens} virtual tokens, inputs "
          f"{min(lengths)}-{max(lengths)} tokens, at most {plan.new_tokens} new tokens, greedy; streamed "
          f"/v1/completions; {plan.warmup} warm-up burst(s) of {plan.tasks} requests; {plan.runs} run(s); "
          f"max batch {plan.max_batch_size} on both")
    print()
    for line in table_lines(plan, figures):
        print(line)
    print()
    for note in NOTES:
        print(f"note: {note}")
    return {
        "machine": machine, "servers": servers, "model": model,
        "plan": {**asdict(plan), "scenarios": [asdict(s) for s in plan.scenarios]},
        "input_tokens": {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)},
        "summary": [{"scenario": asdict(s), **{name: summary(figures, name, k) for name in (SOFTPROMPT, VLLM)},
                     "comparison": compare(figures, k)} for k, s in enumerate(plan.scenarios)],
        "runs": [asdict(f) for f in figures], "notes": list(NOTES),
    }
