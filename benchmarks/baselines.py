"""The reference methods our engine is measured against: HF `generate` (a, b, g) and PEFT (c)."""

from __future__ import annotations

import copy
import gc
import time
from typing import Any

import torch

from softprompt.benchmarks.results import Outcome
from softprompt.benchmarks.workload import Workload, task_name
from softprompt.server.core.model import BaseModel


def row_embeds(model: torch.nn.Module, prompt: torch.Tensor, input_ids: list[int]) -> torch.Tensor:
    """cat(prompt, embed(ids)): one request's model input, [positions, hidden]."""
    ids = torch.tensor(input_ids, device=prompt.device)
    return torch.cat([prompt, model.get_input_embeddings()(ids)])


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacks rows right-aligned, as decoder-only generation needs; returns (embeds, attention_mask)."""
    width = max(r.shape[0] for r in rows)
    first = rows[0]
    embeds = first.new_zeros(len(rows), width, first.shape[1])
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=first.device)
    for i, r in enumerate(rows):
        embeds[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    return embeds, mask


def pad_token_id(base: BaseModel) -> int:
    """The id HF generate pads with (never produced here: min_new_tokens keeps rows running)."""
    tok = base.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def hf_generate(base: BaseModel, embeds: torch.Tensor, mask: torch.Tensor, new_tokens: int,
                **options: Any) -> list[list[int]]:
    """Greedy HF generate over inputs_embeds; exactly `new_tokens` new ids per row."""
    out = base.model.generate(
        inputs_embeds=embeds, attention_mask=mask, do_sample=False, **options,
        # min == max: EOS is suppressed, so every method produces the same number of tokens.
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id(base),
    )
    return out[:, -new_tokens:].tolist()


class HFSequential:
    """(a) One `generate` call per request, in arrival order."""

    def __init__(self, base: BaseModel, work: Workload) -> None:
        self.base, self.work = base, work

    @torch.inference_mode()
    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`."""
        t0 = time.perf_counter()
        outputs, latencies = [], []
        for ids, task in zip(self.work.input_ids, self.work.task_of):
            x = row_embeds(self.base.model, self.work.prompts[task], ids)[None]
            mask = torch.ones(1, x.shape[1], dtype=torch.long, device=x.device)
            outputs += hf_generate(self.base, x, mask, new_tokens)
            latencies.append(time.perf_counter() - t0)
        return Outcome(outputs, latencies)

    def close(self) -> None:
        """Nothing to release."""


class HFBatch:
    """(b) Every request in one left-padded `generate` call."""

    def __init__(self, base: BaseModel, work: Workload) -> None:
        self.base, self.work = base, work

    @torch.inference_mode()
    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`."""
        t0 = time.perf_counter()
        rows = [row_embeds(self.base.model, self.work.prompts[t], ids)
                for ids, t in zip(self.work.input_ids, self.work.task_of)]
        outputs = hf_generate(self.base, *left_pad(rows), new_tokens)
        return Outcome(outputs, [time.perf_counter() - t0] * len(outputs))

    def close(self) -> None:
        """Nothing to release."""


class HFStaticBare:
    """(g) The issue's plain-HF ceiling: the inputs alone (no prompt) in one batch, with a static KV cache."""

    def __init__(self, base: BaseModel, work: Workload) -> None:
        self.base, self.work = base, work

    @torch.inference_mode()
    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`."""
        t0 = time.perf_counter()
        embed = self.base.model.get_input_embeddings()
        rows = [embed(torch.tensor(ids, device=self.base.device)) for ids in self.work.input_ids]
        outputs = hf_generate(self.base, *left_pad(rows), new_tokens, cache_implementation="static")
        return Outcome(outputs, [time.perf_counter() - t0] * len(outputs))

    def close(self) -> None:
        """Nothing to release."""


class PeftPerTask:
    """(c) PEFT prompt tuning, one adapter per task on a private copy of the model, one batch per task."""

    def __init__(self, base: BaseModel, work: Workload, virtual_tokens: int) -> None:
        from peft import PromptTuningConfig, get_peft_model

        self.base, self.work = base, work
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
        # PEFT wraps the model it is given; a copy keeps the served model untouched.
        self.model = get_peft_model(copy.deepcopy(base.model), config, adapter_name=task_name(0))
        for task in range(1, work.tasks):
            self.model.add_adapter(task_name(task), config)
        with torch.no_grad():
            for task, prompt in enumerate(work.prompts):
                self.model.prompt_encoder[task_name(task)].embedding.weight.copy_(prompt)
        self.model.eval()

    @torch.inference_mode()
    def run(self, new_tokens: int) -> Outcome:
        """See `Runner.run`."""
        n = len(self.work.input_ids)
        outputs: list[list[int]] = [[] for _ in range(n)]
        latencies = [0.0] * n
        t0 = time.perf_counter()
        for task in range(self.work.tasks):
            rows = [i for i in range(n) if self.work.task_of[i] == task]
            if not rows:
                continue
            self.model.set_adapter(task_name(task))
            ids, mask = self._left_padded_ids([self.work.input_ids[i] for i in rows])
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=pad_token_id(self.base))
            done = time.perf_counter() - t0
            for row, generated in zip(rows, out[:, ids.shape[1]:].tolist()):
                outputs[row], latencies[row] = generated, done
        return Outcome(outputs, latencies)

    def _left_padded_ids(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = pad_token_id(self.base)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.base.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.base.device)
        return ids, mask

    def close(self) -> None:
        """Frees the model copy."""
        del self.model
        gc.collect()
        if self.base.device.type == "cuda":
            torch.cuda.empty_cache()
