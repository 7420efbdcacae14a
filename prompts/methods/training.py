"""What the trainer asks of a prompt-learning method: its starting prompt, what it learns, how it scores.

`PromptTrainer` (prompts/train.py) is one loop for every method: it asks `method_for(options, model)` for a
`TrainingMethod` and from then on only calls it. A method's prompt is always its stored form, the matrix PEFT
saves (`[n, hidden]` embeddings for "prompt", `[n, num_layers * 2 * token_dim]` keys and values for "prefix"),
so what training evaluates, keeps and registers is exactly what the server serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from softprompt.prompts import inject
from softprompt.prompts.base import KvLayout, kv_layout_of
from softprompt.prompts.errors import InvalidPromptError
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.methods import prefix_tuning
from softprompt.prompts.options import METHOD_PREFIX, METHOD_PROMPT, TrainingOptions


class TrainingMethod(Protocol):
    """One prompt-learning method as training sees it."""

    name: str

    def from_tokens(self, token_ids: Sequence[int]) -> torch.Tensor:
        """The prompt that starts out as these tokens in front of the input (float32, CPU)."""
        ...

    def random(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """A random prompt of `n` virtual tokens at the scale of real ones (float32, CPU)."""
        ...

    def learnable(self, initial: torch.Tensor, options: TrainingOptions) -> torch.nn.Module:
        """What the optimizer trains, on the model's device: `module()` is the prompt, `module.materialize()`
        its stored form (float32, CPU, detached)."""
        ...

    def score(self, model: torch.nn.Module, prompt: torch.Tensor, contexts: Sequence[Sequence[int]],
              continuations: Sequence[Sequence[int]]) -> inject.Continuations:
        """Each row's continuation scored after its context behind `prompt`, as the server computes it."""
        ...

    def registered(self, prompt: torch.Tensor, init: str) -> PromptTensor:
        """The trained prompt as a version to register (saved in PEFT's format for its method)."""
        ...

    def needs_input(self) -> bool:
        """Whether every example needs input tokens (a prefix has no position predicting the first token)."""
        ...


class _Parameter(torch.nn.Module):
    """The prompt itself as the one parameter (prompt tuning)."""

    def __init__(self, initial: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(initial.detach().float().clone())

    def forward(self) -> torch.Tensor:
        return self.weight

    def materialize(self) -> torch.Tensor:
        return self.weight.detach().float().cpu().clone()


class PromptTuning:
    """Virtual-token embeddings `[n, hidden]` in front of the input (PEFT's PROMPT_TUNING)."""

    name = METHOD_PROMPT

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.weight = model.get_input_embeddings().weight

    def from_tokens(self, token_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor(list(token_ids), device=self.weight.device)
        return self.weight.detach()[ids].float().cpu().clone()

    def random(self, n: int, generator: torch.Generator) -> torch.Tensor:
        # Gaussian directions with the typical norm of a real token embedding, not N(0, 1) (whose norm,
        # sqrt(hidden), is many times larger and derails the model).
        weight = self.weight.detach()
        norm = weight.float().norm(dim=-1).mean().item()
        noise = torch.randn(n, weight.shape[1], generator=generator)
        return noise / noise.norm(dim=-1, keepdim=True) * norm

    def learnable(self, initial: torch.Tensor, options: TrainingOptions) -> torch.nn.Module:
        return _Parameter(initial.to(self.weight.device))

    def score(self, model: torch.nn.Module, prompt: torch.Tensor, contexts: Sequence[Sequence[int]],
              continuations: Sequence[Sequence[int]]) -> inject.Continuations:
        return inject.score_continuations(model, [prompt] * len(contexts), contexts, continuations)

    def registered(self, prompt: torch.Tensor, init: str) -> PromptTensor:
        return PromptTensor(prompt, source_type="PROMPT_TUNING", init=init)

    def needs_input(self) -> bool:
        return False


class PrefixTuning:
    """Keys and values of `n` positions in every layer, in front of the input's (PEFT's PREFIX_TUNING)."""

    name = METHOD_PREFIX

    def __init__(self, model: torch.nn.Module, layout: KvLayout) -> None:
        self.model = model
        self.layout = layout
        self.device = model.get_input_embeddings().weight.device

    def from_tokens(self, token_ids: Sequence[int]) -> torch.Tensor:
        return prefix_tuning.initial_prefix(self.model, token_ids, self.layout)

    def random(self, n: int, generator: torch.Generator) -> torch.Tensor:
        # Gaussian keys and values at the scale (per layer, keys and values apart) of those of real tokens.
        vocab = self.model.get_input_embeddings().weight.shape[0]
        reference = self.from_tokens(torch.randint(vocab, (n,), generator=generator).tolist())
        scale = reference.view(n, self.layout.num_layers, 2, -1).std(dim=(0, 3), keepdim=True)
        noise = torch.randn(n, self.layout.num_layers, 2, self.layout.token_dim, generator=generator)
        return (noise * scale).reshape(n, self.layout.width)

    def learnable(self, initial: torch.Tensor, options: TrainingOptions) -> torch.nn.Module:
        return prefix_tuning.PrefixEncoder(initial, self.layout, projection=options.prefix_projection,
                                           encoder_hidden_size=options.encoder_hidden_size,
                                           seed=options.seed).to(self.device)

    def score(self, model: torch.nn.Module, prompt: torch.Tensor, contexts: Sequence[Sequence[int]],
              continuations: Sequence[Sequence[int]]) -> inject.Continuations:
        return prefix_tuning.score_continuations(model, prompt, self.layout, contexts, continuations)

    def registered(self, prompt: torch.Tensor, init: str) -> PromptTensor:
        return PromptTensor(prompt, source_type="PREFIX_TUNING", init=init, layout=self.layout)

    def needs_input(self) -> bool:
        return True


def method_for(name: str, model: torch.nn.Module, layout: KvLayout | None = None) -> TrainingMethod:
    """The training side of method `name` for `model`; a "prefix" on a model without one KV layout is an
    `InvalidPromptError`. `layout` saves reading the model's KV shapes again."""
    if name == METHOD_PROMPT:
        return PromptTuning(model)
    if name == METHOD_PREFIX:
        layout = layout or kv_layout_of(model)
        if layout is None:
            raise InvalidPromptError(
                "this model does not cache keys and values of one shape in every layer, so it cannot learn a "
                "prefix: train with method 'prompt'"
            )
        return PrefixTuning(model, layout)
    raise ValueError(f"unknown method {name!r}")
