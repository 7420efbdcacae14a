"""The catalogue of methods: their letters, names and labels, and the runner that implements each."""

from __future__ import annotations

from pathlib import Path

from softprompt.benchmarks.baselines import HFBatch, HFSequential, HFStaticBare, PeftPerTask
from softprompt.benchmarks.engine_methods import EngineOffline, GrpcServer, GrpcWhileTraining, HttpStreams
from softprompt.benchmarks.results import Runner
from softprompt.benchmarks.workload import Settings, Workload
from softprompt.server.core.model import BaseModel

# The order is the run order: (i) right after (e), so both streaming transports meet the same machine state.
METHODS: dict[str, tuple[str, str]] = {
    "a": ("hf-sequential", "HF generate, one request at a time"),
    "b": ("hf-batch", "HF generate, one left-padded batch"),
    "c": ("peft", "PEFT generate, one batch per task"),
    "d": ("engine", "softprompt engine, offline"),
    "e": ("grpc", "softprompt server, gRPC streams"),
    "i": ("http", "softprompt server, HTTP (OpenAI API) streams"),
    "f": ("grpc-training", "softprompt server, gRPC streams, while a training job runs"),
    "g": ("hf-static", "HF generate, one batch, static cache, no prompt"),
    "h": ("engine-one-task", "softprompt engine, offline, every request on task 0"),
}
# Methods whose rows carry other prompts than (d)'s (or none): their ids are not comparable with (d).
OTHER_PROMPTS = frozenset({"g", "h"})


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
    if key == "i":
        return HttpStreams(s, base, work, store)
    if key == "f":
        return GrpcWhileTraining(s, base, work, store)
    if key == "g":
        return HFStaticBare(base, work)
    return EngineOffline(s, base, work, store, one_task=True)
