"""The victim of tests/test_crash_safety.py: a process that registers prompt versions until it is killed.

It runs in a child process (forked by a multiprocessing forkserver that imported this module, and so
torch, once) and is SIGKILLed at a random moment. Every prompt it registers is derived from a seed, so
the parent can rebuild the exact tensor each stored version must hold; the seed travels in the
version's tags and, once `register` has returned, in a line of the worker's report file.
"""

from __future__ import annotations

import json
import os
import random

import torch
from safetensors.torch import save as save_safetensors
from softprompt.prompts.base import BaseModelSpec
from softprompt.prompts.format.layout import TENSOR_NAME
from softprompt.prompts.format.uploads import parse_peft_adapter
from softprompt.prompts.registry import Registry

TASK = "crash"
ALIAS = "prod"


def prompt_for(seed: int, hidden: int) -> torch.Tensor:
    """The prompt matrix registered for `seed`: 1-6 rows, scaled like the tiny model's embeddings."""
    g = torch.Generator().manual_seed(seed)
    rows = 1 + seed % 6
    return torch.randn(rows, hidden, generator=g) * 0.5


def adapter_for(seed: int, spec: BaseModelSpec) -> tuple[str, bytes]:
    """The PEFT upload (adapter_config.json text, adapter_model.safetensors bytes) for `seed`."""
    tensor = prompt_for(seed, spec.hidden_size)
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": tensor.shape[0],
              "token_dim": spec.hidden_size, "num_layers": spec.num_layers}
    return json.dumps(config), save_safetensors({TENSOR_NAME: tensor}, metadata={"format": "pt"})


def _report(fd: int, line: str) -> None:
    # One short write per line: a kill can cut the file only between lines, or leave a last line
    # without its newline, which the reader ignores.
    os.write(fd, (line + "\n").encode())


def register_until_killed(root: str, spec: BaseModelSpec, report_path: str, first_seed: int, limit: int) -> None:
    """Registers versions of `TASK` (PEFT uploads, parsed and validated as the server does) in a loop.

    Writes "start" once the registry is open, then "<version> <seed>" after each registration returns.
    Every third version also moves the alias, so aliases.json is rewritten under fire too. Stops after
    `limit` registrations if nobody killed it first.
    """
    fd = os.open(report_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    registry = Registry(root)
    rng = random.Random(first_seed)
    _report(fd, "start")
    for seed in range(first_seed, first_seed + limit):
        config_json, weights = adapter_for(seed, spec)
        prompt = parse_peft_adapter(config_json, weights, spec, max_virtual_tokens=32)
        version = registry.register(TASK, prompt, spec, description=f"seed {seed}", tags={"seed": str(seed)})
        _report(fd, f"{version.version} {seed}")
        if rng.random() < 1 / 3:
            registry.set_alias(TASK, ALIAS, version.version)
    _report(fd, "done")
    os.close(fd)


def read_report(path: str) -> tuple[bool, bool, dict[int, int]]:
    """Parses a report file: (started, finished, {version: seed}) from its complete lines."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return False, False, {}
    lines = text.split("\n")[:-1]  # the last piece lacks its newline (or is empty)
    versions: dict[int, int] = {}
    for line in lines:
        if line in ("start", "done"):
            continue
        version, seed = line.split()
        versions[int(version)] = int(seed)
    return "start" in lines, "done" in lines, versions
