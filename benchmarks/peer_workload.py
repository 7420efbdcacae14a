"""The peer benchmark's plan and workload: the requests both servers get, and their bodies (see `peer`)."""

from __future__ import annotations

import base64
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from softprompt.benchmarks.workload import SENTENCES, make_prompts

SEED = 1234
HOST = "127.0.0.1"
START_TIMEOUT_S = 900.0  # vLLM compiles its model at startup: ~2 min on 2 cores, more on a busy machine
STREAM_TIMEOUT_S = 3600.0
WARMUP_TOKENS = 8
SOFTPROMPT = "softprompt"
VLLM = "vLLM"
VLLM_MODEL_NAME = "peer-base"
DEFAULT_VLLM_PYTHON = "/tmp/vllm-venv/bin/python"
# vLLM's CPU backend reserves no KV cache unless told; softprompt reserves 2 GiB on a CPU by default.
DEFAULT_VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}



# ---------------------------------------------------------------------------------------------------------------
# The plan and the workload


@dataclass(frozen=True)
class Scenario:
    """One timed phase: `requests` requests sent by `streams` concurrent streaming clients."""

    streams: int
    requests: int

    @property
    def label(self) -> str:
        """How the report names it."""
        return f"{self.streams} streams, {self.requests} requests"


@dataclass(frozen=True)
class Plan:
    """What every server is asked, and how."""

    scenarios: tuple[Scenario, ...] = (Scenario(16, 64), Scenario(64, 128))
    tasks: int = 8
    virtual_tokens: int = 20
    new_tokens: int = 64
    input_tokens: int = 32
    runs: int = 1
    warmup: int = 1
    max_batch_size: int = 64


@dataclass(frozen=True)
class Request:
    """One request: its task (an index into the prompts), its text and the ids softprompt makes of it."""

    task: int
    text: str
    input_ids: list[int]


@dataclass(frozen=True)
class Workload:
    """The prompts, the embedding table the vLLM client embeds inputs with, and each phase's requests."""

    prompts: list[torch.Tensor]  # [virtual_tokens, hidden] float32, one per task
    table: torch.Tensor  # [vocab, hidden] float32: the model's input embeddings
    warmup: list[Request]
    scenarios: list[list[Request]]  # one list per Scenario of the plan


def task_name(task: int) -> str:
    """The softprompt registry name (and HTTP `model`) of a task."""
    return f"peer-task-{task}"


def make_texts(tokenizer: Any, count: int, input_tokens: int) -> list[str]:
    """`count` different inputs of about `input_tokens` tokens: windows of the built-in sentences in a seeded random
    order, each starting at a random word (a window already made is drawn again)."""
    rng = random.Random(SEED)
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < count:
        words = " ".join(rng.sample(SENTENCES, len(SENTENCES))).split()
        start = rng.randrange(len(words))
        # A word is at least one token, so 2x the words (wrapping around) leaves enough to cut.
        long = " ".join(words[(start + k) % len(words)] for k in range(2 * input_tokens + 8))
        text = tokenizer.decode(tokenizer(long, add_special_tokens=False).input_ids[:input_tokens]).strip()
        if text not in seen or len(seen) > 100 * count:  # give up on uniqueness rather than loop forever
            seen.add(text)
            texts.append(text)
    return texts


def make_requests(tokenizer: Any, texts: Sequence[str], tasks: int) -> list[Request]:
    """Requests round-robin over the tasks, tokenized as softprompt's `/v1/completions` tokenizes a string prompt
    (`softprompt.prompts.tokens.encode_input` without the chat template)."""
    from softprompt.prompts.tokens import encode_input

    return [Request(i % tasks, text, encode_input(tokenizer, text)) for i, text in enumerate(texts)]


def build_workload(model: Any, tokenizer: Any, plan: Plan) -> Workload:
    """Prompts like `softprompt bench`'s (`workload.make_prompts`), the float32 embedding table, and the requests
    of the warm-up (one per task) and of each scenario, no text used twice (so no phase reuses another's requests
    through a prefix cache)."""
    sizes = [plan.tasks, *(s.requests for s in plan.scenarios)]
    texts = make_texts(tokenizer, sum(sizes), plan.input_tokens)
    phases, at = [], 0
    for size in sizes:
        phases.append(make_requests(tokenizer, texts[at:at + size], plan.tasks))
        at += size
    return Workload(
        prompts=make_prompts(model, plan.tasks, plan.virtual_tokens, torch.float32),
        table=model.get_input_embeddings().weight.detach().float().cpu().clone(),
        warmup=phases[0],
        scenarios=phases[1:],
    )


def embeds_payload(prompt: torch.Tensor, table: torch.Tensor, input_ids: Sequence[int]) -> str:
    """vLLM's `prompt_embeds` for one request: base64 of `torch.save` of `[prompt ; table[input_ids]]`, float32."""
    rows = torch.cat([prompt.float(), table[torch.tensor(list(input_ids), dtype=torch.long)]]).contiguous()
    buffer = io.BytesIO()
    torch.save(rows, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decoding_fields(new_tokens: int) -> dict[str, Any]:
    """What both servers get besides the input: greedy, streamed, the usage in a last event."""
    return {"max_tokens": new_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


def softprompt_body(request: Request, new_tokens: int) -> dict[str, Any]:
    """softprompt's request: the task as the model, the text as the prompt."""
    return {"model": task_name(request.task), "prompt": request.text, **decoding_fields(new_tokens)}


def vllm_body(model: str, request: Request, work: Workload, new_tokens: int) -> dict[str, Any]:
    """vLLM's request: the whole input as embeddings, no `prompt`."""
    payload = embeds_payload(work.prompts[request.task], work.table, request.input_ids)
    return {"model": model, "prompt_embeds": payload, **decoding_fields(new_tokens)}
