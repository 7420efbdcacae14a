"""The printed report: machine and versions, the results table, the engine's time split, the ratios."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from softprompt.benchmarks.methods import OTHER_PROMPTS
from softprompt.benchmarks.results import MethodResult
from softprompt.benchmarks.workload import Settings, Workload
from softprompt.server.core.model import BaseModel


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


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _mib(value: int) -> str:
    return f"{value / 2**20:,.0f} MiB"


def agrees(ids: list[int], reference: list[int], eos_ids: frozenset[int]) -> bool:
    """Whether `ids` equals `reference` up to the reference's first EOS.

    Past that point the methods part ways by design: HF's min_new_tokens masks EOS and takes the
    runner-up, while our engine, told to ignore EOS here, emits EOS and goes on.
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
        if reference is not None and r.key not in OTHER_PROMPTS and r.outputs is not None:
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
        mixed = f", mixed (prefill inside a decode step) {part['mixed']}" if "mixed" in part else ""
        lines.append(
            f"({r.key}) engine time (s/calls): prefill {part['prefill']}, decode {part['decode']}{mixed}, of which "
            f"sampling+detokenizing {part['emit']}; filter {part['filter']}, concatenate {part['concatenate']}; "
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
    """The ids our engine ends a request on (unless told to ignore them, as this bench does)."""
    from softprompt.prompts.tokens import eos_token_ids

    return frozenset(eos_token_ids(base.model, base.tokenizer))


IDENTICAL_LABEL = "outputs identical ((d), (e), (f) by ids; (i) by text against (e))"


def identical(results: list[MethodResult]) -> bool | None:
    """Whether (d), (e) and (f), all our greedy engine, produced the same ids for every request, and (i),
    whose HTTP API streams text only, the same text as (e); None when fewer than two of them ran."""
    by_key = {r.key: r for r in results}
    checks = []
    ours = [by_key[k].outputs for k in ("d", "e", "f") if k in by_key]
    if len(ours) >= 2:
        checks.append(all(o == ours[0] for o in ours[1:]))
    if "e" in by_key and "i" in by_key:
        checks.append(by_key["i"].texts == by_key["e"].texts)
    return all(checks) if checks else None


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


def http_line(results: list[MethodResult]) -> list[str]:
    """What the OpenAI-compatible HTTP API costs against gRPC: (i) against (e)."""
    by_key = {r.key: r for r in results}
    if "e" not in by_key or "i" not in by_key:
        return []
    e, i = by_key["e"], by_key["i"]
    return [f"(i)/(e) HTTP streams vs gRPC streams: {i.tokens_per_s / e.tokens_per_s:.2f}x tokens/s, "
            f"TTFT p50 {i.ttft_p50_s / e.ttft_p50_s:.2f}x"]


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
        "all requests arrive at once; latency = arrival to last token ((e), (f), (i): from its client's send); "
        "TTFT = submit to first streamed token ((i): to the first streamed event with a choice).",
        "peak mem: " + ("torch.cuda.max_memory_allocated, reset before each timed run." if base.device.type == "cuda"
                        else "process-wide peak RSS so far (never resets: later methods include earlier ones)."),
        "ids = (d): requests whose greedy ids equal our engine's up to its first EOS (after it HF, which masks EOS "
        "for min_new_tokens, takes another token); informative: padding and kernels can flip near-ties. (i)'s API "
        "streams text, not ids: n/a, checked against (e)'s text instead.",
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
          f"{settings['clients']} streaming clients; engine max batch {s.batch_size}; {s.warmup} warm-up run(s)",
          file=out)
    print(file=out)
    lines = [*table(results, eos_ids(base)), "", *engine_lines(results), *ratio_lines(results),
             *registration_line(results), *training_line(results), *http_line(results)]
    for line in lines:
        print(line, file=out)
    print(f"{IDENTICAL_LABEL}: {'n/a' if same is None else 'yes' if same else 'no'}", file=out)
    print(file=out)
    for note in notes:
        print(f"note: {note}", file=out)
    return {
        "machine": machine, "versions": libs, "settings": settings, "notes": notes, "outputs_identical": same,
        "methods": {r.key: {k: v for k, v in vars(r).items() if k != "key"} for r in results},
    }
