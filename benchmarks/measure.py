"""Times one method: set up, warm up, one timed run, then its throughput, latency, memory and CPU contention."""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import torch

from softprompt.benchmarks.methods import METHODS, make_runner
from softprompt.benchmarks.results import MethodResult, percentile
from softprompt.benchmarks.workload import Settings, Workload
from softprompt.server.core.model import BaseModel

# Warm-up runs only need every kernel and code path touched once; a few tokens do that.
WARMUP_TOKENS = 4


def progress(message: str) -> None:
    """One log line per phase, on stderr so stdout keeps only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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
    made = outcome.made()
    if any(m != s.new_tokens for m in made):
        raise RuntimeError(f"({key}) {label} generated {made} tokens, not {s.new_tokens} per request")
    generated = sum(made)
    ttfts = outcome.ttfts
    result = MethodResult(
        key=key, name=name, label=label, wall_s=wall, generated_tokens=generated, tokens_per_s=generated / wall,
        latency_p50_s=percentile(outcome.latencies, 50), latency_p99_s=percentile(outcome.latencies, 99),
        ttft_p50_s=percentile(ttfts, 50) if ttfts else None, ttft_p99_s=percentile(ttfts, 99) if ttfts else None,
        peak_memory_bytes=memory, memory_kind=kind, other_load_cores=others, outputs=outcome.outputs,
        texts=outcome.texts, extra=outcome.extra,
    )
    progress(f"({key}) {result.tokens_per_s:.1f} generated tokens/s in {wall:.2f} s")
    return result
