"""What every method serves: the bench's settings, the requests and their prompts, and the shared model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from softprompt.server.app.loading import default_cache_dir, load_base_model, parse_dtype, resolve_model_path
from softprompt.server.core.model import BaseModel, default_device, default_dtype

SEED = 1234

# Built-in inputs: plain sentences, repeated to the asked length so no data set is needed.
SENTENCES = (
    "The committee postponed its decision until the budget figures were checked again.",
    "A small cafe on the corner sells bread that is baked before sunrise every day.",
    "Rain is expected in the north tomorrow, with clearer skies reaching the coast by evening.",
    "She fixed the old bicycle with parts taken from two others that no longer worked.",
    "The museum opens a new exhibition of early photographs of the harbour next month.",
    "Customers said the delivery was late but the product itself worked exactly as described.",
    "Engineers measured the bridge after the storm and found no damage to its supports.",
    "The recipe needs two eggs, a cup of flour, some milk and a pinch of salt.",
)


@dataclass(frozen=True)
class Settings:
    """The bench's flags, parsed."""

    requests: int
    tasks: int
    virtual_tokens: int
    new_tokens: int
    input_tokens: int
    data: Path | None
    clients: int
    batch_size: int
    model: str | None
    device: str | None
    dtype: str | None
    random_weights: Path | None
    skip: frozenset[str]
    json_out: Path | None
    warmup: int
    cuda_graphs: bool = True
    packed_linears: bool = True  # CPU float32: linear layers on oneDNN-packed weights
    paged_kernel: bool = True  # CPU float32: decode attention over the KV blocks in place
    mixed_steps: bool = True  # with the kernel: arrivals prefilled in the decode step's forward
    fair_share: str = "task"  # the servers' --fair-share: task, token or off


@dataclass(frozen=True)
class Workload:
    """The requests every method serves: per request its text, token ids and task; per task its prompt."""

    texts: list[str]
    input_ids: list[list[int]]
    task_of: list[int]
    prompts: list[torch.Tensor]  # [virtual_tokens, hidden], model dtype and device

    @property
    def tasks(self) -> int:
        """Distinct prompts."""
        return len(self.prompts)


def build_texts(tokenizer: Any, count: int, input_tokens: int, data: Path | None) -> list[str]:
    """One input per request: lines of `data` ({"input": ...} JSONL, cycled) or built-in sentences."""
    if data is not None:
        lines = [json.loads(line)["input"] for line in data.read_text().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{data} holds no {{\"input\": ...}} lines")
        return [lines[i % len(lines)] for i in range(count)]
    words = " ".join(SENTENCES).split()
    texts = []
    for i in range(count):
        # Each request starts at another word (7 is coprime with the word count), so no two of the
        # first len(words) requests share a text; a word is at least one token, hence 2x words.
        start = i * 7
        long = " ".join(words[(start + k) % len(words)] for k in range(2 * input_tokens + 8))
        ids = tokenizer(long, add_special_tokens=False).input_ids[:input_tokens]
        texts.append(tokenizer.decode(ids).strip())
    return texts


def make_prompts(model: torch.nn.Module, tasks: int, virtual_tokens: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Seeded random prompts whose rows have the embedding matrix's mean row norm.

    N(0, 1) rows would be far larger than real token embeddings and push the model off its inputs'
    scale; matching the norm keeps the attention pattern realistic.
    """
    weight = model.get_input_embeddings().weight.detach().float()
    norm = float(weight.norm(dim=-1).mean())
    gen = torch.Generator().manual_seed(SEED)
    prompts = []
    for _ in range(tasks):
        rows = torch.randn(virtual_tokens, weight.shape[1], generator=gen)
        rows = rows / rows.norm(dim=-1, keepdim=True) * norm
        prompts.append(rows.to(device=weight.device, dtype=dtype))
    return prompts


def build_workload(base: BaseModel, s: Settings) -> Workload:
    """Inputs tokenized like admission does (no chat template), tasks round-robin over requests."""
    texts = build_texts(base.tokenizer, s.requests, s.input_tokens, s.data)
    return Workload(
        texts=texts,
        input_ids=[list(base.tokenizer(t).input_ids) for t in texts],
        task_of=[i % s.tasks for i in range(s.requests)],
        prompts=make_prompts(base.model, s.tasks, s.virtual_tokens, base.dtype),
    )


def task_name(task: int) -> str:
    """The registry name of a task's prompt."""
    return f"bench-task-{task}"


def random_weight_model(config_json: Path, tokenizer_model: str | None, device: str | None,
                        dtype: str | None) -> BaseModel:
    """A model of the config's shape with random weights (no download), and the tokenizer of `tokenizer_model`.

    Speed depends on shapes, not weight values, so this measures e.g. a 1B model on a GPU box
    that has no weights; generated text is meaningless.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from softprompt.prompts.base import spec_of

    dev = torch.device(device) if device else default_device()
    dt = parse_dtype(dtype) if dtype else default_dtype(dev)
    values = json.loads(config_json.read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(SEED)
    with dev:  # initialising on the device: a 1B model's CPU init takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    model.eval()
    model.requires_grad_(False)
    path, _ = resolve_model_path(tokenizer_model, default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer of {path} has {len(tokenizer)} tokens but {config_json} has vocab_size "
                         f"{config.vocab_size}: use a config with at least as many")
    return BaseModel(model=model, tokenizer=tokenizer, spec=spec_of(model, f"random:{config_json.name}"),
                     device=dev, dtype=dt)


def load_model(s: Settings) -> BaseModel:
    """The model every method shares."""
    if s.random_weights is not None:
        return random_weight_model(s.random_weights, s.model, s.device, s.dtype)
    return load_base_model(s.model, device=s.device, dtype=s.dtype)
