"""KV-level prompts: PEFT's PREFIX_TUNING (Li & Liang 2021; P-tuning v2) and CARTRIDGE adapters.

Such a prompt is keys and values: for each of its `num_virtual_tokens` positions, a key and a value in every
layer, stored as PEFT stores them, one ``[num_virtual_tokens, num_layers * 2 * token_dim]`` matrix (per token:
layer 0's key, layer 0's value, layer 1's key, ...; ``token_dim`` = KV heads x head size, PEFT's
grouped-query sizing). PEFT's `PeftModel` hands it to the model as the cache in front of the input: the
input's tokens take positions ``num_virtual_tokens ...``, attend to every prefix position (sliding windows
measured in those positions), and the keys are used as they are, no rotary embedding applied to them.
Serving writes the same matrix into a row's first KV slots (server/core/virtual.py); training and
evaluation score over it as a transformers cache (`kvcache.prefix_cache`), so both compute what PEFT does.

Here: checking an uploaded adapter against the base model's `KvLayout` (`parse_adapter`, with or without
PEFT's ``prefix_projection`` materialized), PEFT's reparameterization MLP for training (`PrefixEncoder`),
initial prefixes (the keys and values the model computes for some tokens: `initial_prefix`), and scoring
continuations behind a prefix (`score_continuations`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from softprompt.prompts import inject
from softprompt.prompts.base import BaseModelSpec, KvLayout
from softprompt.prompts.errors import InvalidPromptError
from softprompt.prompts.format.tensor import PromptTensor, validate_kv_prefix
from softprompt.prompts.kvcache import cache_kwarg, prefix_cache

_FIX = "train the prefix on this base model (PrefixTuningConfig on the model this server serves)"

# The parameters of PEFT's PrefixEncoder with prefix_projection, by the end of their state-dict names.
_ENCODER_PARTS = ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                  "transform.2.bias")


def _config_int(config: Mapping[str, Any], key: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPromptError(f"adapter_config.json field {key} must be an integer, got {value!r:.80}")
    return value


def check_config(config: Mapping[str, Any], base: BaseModelSpec) -> KvLayout:
    """The base model's `KvLayout`, after checking that the adapter's config describes it (each field that
    is present); `InvalidPromptError` naming the first field that differs."""
    peft_type = config.get("peft_type", "PREFIX_TUNING")
    layout = base.kv_layout
    if layout is None:
        raise InvalidPromptError(
            f"{base.model_id} does not cache keys and values of one shape in every layer, so a {peft_type} "
            f"adapter (keys and values per layer) cannot be served on it: use PROMPT_TUNING instead"
        )
    layers = _config_int(config, "num_layers")
    if layers is not None and layers != layout.num_layers:
        raise InvalidPromptError(
            f"adapter_config.json field num_layers is {layers} but {base.model_id} has {layout.num_layers} layers: "
            f"a {peft_type} adapter holds keys and values for every layer of the model it was made for; {_FIX}"
        )
    heads = _config_int(config, "num_attention_heads")
    if heads is not None and heads != layout.kv_heads:
        raise InvalidPromptError(
            f"adapter_config.json field num_attention_heads is {heads} but {base.model_id} caches "
            f"{layout.kv_heads} KV heads per layer (PEFT sizes a prefix by KV heads under grouped-query "
            f"attention); {_FIX}"
        )
    token_dim = _config_int(config, "token_dim")
    if token_dim is not None and token_dim != layout.token_dim:
        head = f" (head size {token_dim // heads})" if heads else ""
        raise InvalidPromptError(
            f"adapter_config.json field token_dim is {token_dim}{head} but {base.model_id} caches "
            f"{layout.kv_heads} KV heads x head size {layout.head_dim} = {layout.token_dim} per layer and token; {_FIX}"
        )
    return layout


def parse_adapter(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], base: BaseModelSpec, *,
                  max_virtual_tokens: int) -> PromptTensor:
    """A PREFIX_TUNING or CARTRIDGE adapter's config and tensors, checked against `base`, as a `PromptTensor`.

    `tensors` is what ``adapter_model.safetensors`` holds: the one ``prompt_embeddings`` matrix PEFT's
    ``save_pretrained`` writes (the prefix itself, whether or not ``prefix_projection`` trained it), or the
    parameters of PEFT's prefix encoder with its projection MLP (``embedding.weight``, ``transform.*``), which
    are materialized here into that matrix. Raises `InvalidPromptError` naming what does not fit.
    """
    peft_type = str(config.get("peft_type"))
    layout = check_config(config, base)
    if len(tensors) == 1:
        (name, matrix), = tensors.items()
    else:
        matrix, name = materialize_projection(tensors, layout), "prompt_embeddings"
    if isinstance(matrix, torch.Tensor) and matrix.dim() == 2:
        rows = int(matrix.shape[0])
        config_rows = _config_int(config, "num_virtual_tokens")
        if config_rows is not None and config_rows != rows:
            raise InvalidPromptError(
                f"adapter_config.json says num_virtual_tokens={config_rows} but the tensor {name!r} has {rows} rows: "
                f"the config and weights come from different adapters; upload the pair save_pretrained wrote"
            )
    kv = validate_kv_prefix(matrix, base, max_virtual_tokens=max_virtual_tokens)
    return PromptTensor(embeddings=kv, source_type=peft_type, layout=layout)


def materialize_projection(tensors: Mapping[str, torch.Tensor], layout: KvLayout) -> torch.Tensor:
    """The prefix PEFT's PrefixEncoder with ``prefix_projection`` computes from its parameters:
    ``transform(embedding.weight)``, transform = Linear -> tanh -> Linear (as `get_prompt_embedding_to_save`)."""
    found: dict[str, torch.Tensor] = {}
    for part in _ENCODER_PARTS:
        matches = [t for name, t in tensors.items() if name == part or name.endswith("." + part)]
        if len(matches) != 1:
            names = ", ".join(sorted(tensors)) or "none"
            raise InvalidPromptError(
                f"adapter_model.safetensors holds {len(tensors)} tensors ({names:.300}): a prefix adapter is one "
                f"tensor 'prompt_embeddings' (what save_pretrained writes), or its prefix encoder's parameters "
                f"{', '.join(_ENCODER_PARTS)}"
            )
        found[part] = matches[0]
    if any(t.dtype not in (torch.float32, torch.float16, torch.bfloat16) for t in found.values()):
        raise InvalidPromptError("the prefix encoder's parameters must be float32, float16 or bfloat16")
    embedding, w0, b0, w2, b2 = (found[p].float() for p in _ENCODER_PARTS)
    if (embedding.dim() != 2 or w0.dim() != 2 or w2.dim() != 2 or w0.shape[1] != embedding.shape[1]
            or b0.shape != (w0.shape[0],) or w2.shape[1] != w0.shape[0] or b2.shape != (w2.shape[0],)):
        raise InvalidPromptError(
            f"the prefix encoder's parameters do not chain (embedding {list(embedding.shape)}, transform.0 "
            f"{list(w0.shape)}, transform.2 {list(w2.shape)}): upload the files save_pretrained wrote"
        )
    if w2.shape[0] != layout.width:
        raise InvalidPromptError(
            f"the prefix encoder's output is {w2.shape[0]} wide but the model's prefix is {layout.width} "
            f"({layout.describe()}): {_FIX}"
        )
    with torch.no_grad():
        return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(embedding, w0, b0)), w2, b2)


# ---------------------------------------------------------------------------------------------- training


class PrefixEncoder(torch.nn.Module):
    """What training learns for a prefix: `forward()` is the ``[num_virtual_tokens, width]`` matrix.

    Without projection the matrix itself is the parameter (PEFT's PrefixEncoder without
    ``prefix_projection``). With it, PEFT's reparameterization (Li & Liang): an embedding
    ``[num_virtual_tokens, token_dim]`` through ``Linear(token_dim, encoder_hidden) -> tanh ->
    Linear(encoder_hidden, width)``, the same modules and names as PEFT's, its last layer zero-initialized
    (PEFT's ``init_weights="zero"``) and added to the initial prefix, so training starts from that prefix.
    `materialize` gives the plain matrix PEFT saves.
    """

    def __init__(self, initial: torch.Tensor, layout: KvLayout, *, projection: bool = False,
                 encoder_hidden_size: int = 0, seed: int = 0) -> None:
        super().__init__()
        rows = int(initial.shape[0])
        self.projection = projection
        initial = initial.detach().float()
        if not projection:
            self.embedding = torch.nn.Embedding(rows, layout.width, _weight=initial.clone())
            return
        gen = torch.Generator().manual_seed(seed)
        hidden = encoder_hidden_size or layout.token_dim
        self.embedding = torch.nn.Embedding(rows, layout.token_dim,
                                            _weight=torch.randn(rows, layout.token_dim, generator=gen))
        torch.manual_seed(seed)
        self.transform = torch.nn.Sequential(torch.nn.Linear(layout.token_dim, hidden), torch.nn.Tanh(),
                                             torch.nn.Linear(hidden, layout.width))
        torch.nn.init.zeros_(self.transform[2].weight)
        torch.nn.init.zeros_(self.transform[2].bias)
        self.register_buffer("initial", initial.clone())

    def forward(self) -> torch.Tensor:
        if not self.projection:
            return self.embedding.weight
        return self.initial + self.transform(self.embedding.weight)

    def materialize(self) -> torch.Tensor:
        """The prefix as PEFT saves it: float32, CPU, detached."""
        with torch.no_grad():
            return self.forward().detach().float().cpu().clone()


def initial_prefix(model: torch.nn.Module, token_ids: Sequence[int], layout: KvLayout) -> torch.Tensor:
    """The keys and values the model computes for `token_ids` at positions 0, 1, ...: a prefix that starts out
    exactly as those tokens in front of the input (the Cartridges paper's initialization), float32, CPU."""
    from transformers import DynamicCache

    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([list(token_ids)], device=device)
    cache = DynamicCache()  # no config: every layer keeps all positions, the model masks as it does
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
              **{cache_kwarg(type(model)): cache})
    layers = [(cache.layers[i].keys, cache.layers[i].values) for i in range(layout.num_layers)]
    # [1, heads, n, dim] per layer, key and value -> [n, layers, 2, heads, dim] -> PEFT's [n, width]
    stacked = torch.stack([torch.stack([k[0], v[0]]) for k, v in layers])  # [layers, 2, heads, n, dim]
    return stacked.permute(3, 0, 1, 2, 4).reshape(len(token_ids), layout.width).float().cpu().clone()


def score_continuations(model: torch.nn.Module, kv: torch.Tensor, layout: KvLayout,
                        contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
                        ) -> inject.Continuations:
    """Scores each row's continuation after its context behind the prefix `kv` ``[n, width]``, in one
    teacher-forced forward, as PEFT's forward computes it: the prefix as the cache, the tokens at positions
    n, n + 1, ... (right padding). Gradients flow into `kv`. Every row needs a context token: a prefix has
    no position that predicts the first token after it."""
    if any(not ctx for ctx in contexts):
        raise ValueError("a continuation behind a prefix needs context tokens in front of it")
    n = int(kv.shape[0])
    embedding = model.get_input_embeddings()
    inputs = inject.build_inputs(embedding, [None] * len(contexts),
                                 [[*c, *t] for c, t in zip(contexts, continuations)], padding=inject.RIGHT)
    batch = inputs.embeds.shape[0]
    mask = torch.cat([inputs.attention_mask.new_ones(batch, n), inputs.attention_mask], dim=1)
    cache = prefix_cache(model, kv.to(embedding.weight.device), layout, batch)
    out = model(inputs_embeds=inputs.embeds, attention_mask=mask, position_ids=inputs.position_ids + n,
                use_cache=True, **{cache_kwarg(type(model)): cache})
    firsts = [len(ctx) - 1 for ctx in contexts]
    return inject.gather_continuations(out.logits, firsts, continuations)

