"""Request settings shared by the client, the wire mappings and the server, one dataclass each.

`DecodingOptions`: how one generation picks tokens and when it stops, from the client's call through
the wire (`protos/options.py`) and admission (which fills in the server's defaults) to the sampler;
`DecodingKeywords` is the same fields as typed keyword arguments (the client's `generate(..., top_p=0.9)`).
`TrainingOptions`: how to train one prompt, shared by the trainer, the Training service and the client.

Pure Python (no torch), so the client library and CLI can build and check options without the
server's dependencies. Every training field has a default that works on the default model without tuning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypedDict
MAX_STOP_CHARS = 256  # the longest stop sequence a server takes (each is matched against the text every step)


@dataclass(frozen=True)
class DecodingOptions:
    """How one generation picks tokens and when it stops; zero values mean the server's defaults or off.

    Attributes:
        max_new_tokens: tokens to generate at most (0: the server's default, ModelInfo's
            `limits.default_max_new_tokens`); admission replaces 0 by that default.
        temperature: 0 decodes greedily; > 0 samples from softmax(logits / temperature).
        top_k: sampling keeps the k most likely tokens (0: off).
        top_p: sampling keeps the most likely tokens until their probability reaches top_p (0 or 1: off).
        seed: makes a sampled request reproducible, whatever shares its batch (None: not seeded).
        stop: generation ends when the text ends with one of these; the stop text is not returned.
            Any sequence of strings is kept as a tuple; a lone string is one stop sequence.
        chat: the input is wrapped as a user turn with the model's chat template before tokenizing.
    """

    max_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    chat: bool = False

    def __post_init__(self) -> None:
        # A lone string is a common slip for a one-element list: iterated, it would stop on each character.
        # A tuple also keeps the options hashable and equal whatever sequence they were given.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        """Temperature 0 means argmax decoding."""
        return self.temperature <= 0.0

    @property
    def top_p_on(self) -> bool:
        """top_p filters only strictly between 0 and 1."""
        return 0.0 < self.top_p < 1.0


class DecodingKeywords(TypedDict, total=False):
    """`DecodingOptions`'s fields as keyword arguments, for `**decoding: Unpack[DecodingKeywords]`.

    Typed like the dataclass's fields, name for name (a test keeps the two equal), so a call such as
    `client.generate(task, text, top_p=0.9)` is checked as `DecodingOptions(top_p=0.9)` would be.
    """

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: Sequence[str]
    chat: bool


# How a prompt is served and trained: virtual-token embeddings in front of the input ("prompt": PEFT's
# prompt tuning), or keys and values in front of every layer's KV cache ("prefix": prefix tuning, P-tuning v2).
METHOD_PROMPT = "prompt"
METHOD_PREFIX = "prefix"
METHODS = (METHOD_PROMPT, METHOD_PREFIX)

INIT_VOCAB = "vocab"
INIT_RANDOM = "random"
INIT_TEXT_PREFIX = "text:"
INIT_FROM_PREFIX = "from:"


@dataclass(frozen=True)
class TrainingOptions:
    """How to train one soft prompt; see `softprompt train --help` for each field's meaning.

    Attributes:
        num_virtual_tokens: rows of the learned `[num_virtual_tokens, hidden]` prompt.
        init: "vocab" (embeddings of sampled vocabulary tokens), "random" (Gaussian scaled to the
            embedding norm), "text:SOME WORDS" (the words' embeddings, repeated to fill) or
            "from:TASK[@VERSION]" (warm start from a registered prompt of the same length).
        learning_rate: AdamW learning rate of the prompt.
        epochs: passes over the training data.
        max_steps: cap on optimizer steps (0: no cap).
        batch_size: examples per forward pass.
        grad_accum: forward passes per optimizer step.
        max_length: tokens per example (input + target); longer inputs are cut at the end.
        seed: makes initialisation, shuffling and the held-out split reproducible.
        eval_fraction: share of the training data held out when no eval data is given.
        eval_every: optimizer steps between held-out evaluations (0: once per epoch).
        patience: evaluations without a better held-out loss before stopping early (0: never).
        apply_chat_template: wrap each input as a user turn, as generation does when asked.
        warmup_steps: linear learning-rate warm-up.
        method: "prompt" (prompt tuning: `num_virtual_tokens` input embeddings) or "prefix" (prefix tuning:
            keys and values of `num_virtual_tokens` positions in every layer); `init` makes a prefix from
            the keys and values the model computes for the init's tokens.
        prefix_projection: with "prefix", learn the prefix through PEFT's reparameterization MLP
            (embedding -> linear -> tanh -> linear), materialized into plain keys and values at the end.
        encoder_hidden_size: the MLP's hidden width (0: PEFT's default, the prefix's token_dim).
    """

    num_virtual_tokens: int = 20
    init: str = INIT_VOCAB
    learning_rate: float = 0.03
    epochs: int = 3
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    seed: int = 0
    eval_fraction: float = 0.1
    eval_every: int = 0
    patience: int = 3
    apply_chat_template: bool = False
    warmup_steps: int = 0
    method: str = METHOD_PROMPT
    prefix_projection: bool = False
    encoder_hidden_size: int = 0

    def __post_init__(self) -> None:
        _at_least("num_virtual_tokens", self.num_virtual_tokens, 1)
        _at_least("epochs", self.epochs, 1)
        _at_least("max_steps", self.max_steps, 0)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("grad_accum", self.grad_accum, 1)
        _at_least("max_length", self.max_length, 2)
        _at_least("seed", self.seed, 0)
        _at_least("eval_every", self.eval_every, 0)
        _at_least("patience", self.patience, 0)
        _at_least("warmup_steps", self.warmup_steps, 0)
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        if not (isinstance(self.eval_fraction, (int, float)) and 0.0 <= self.eval_fraction < 1.0):
            raise ValueError(f"eval_fraction must be within [0, 1), got {self.eval_fraction!r}")
        init_kind(self.init)
        if self.method not in METHODS:
            raise ValueError(f"method must be {' or '.join(repr(m) for m in METHODS)}, got {self.method!r}")
        _at_least("encoder_hidden_size", self.encoder_hidden_size, 0)
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection must be true or false, got {self.prefix_projection!r}")
        if self.method != METHOD_PREFIX and (self.prefix_projection or self.encoder_hidden_size):
            raise ValueError("prefix_projection and encoder_hidden_size apply to method 'prefix' only")

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-ready values (stored with the trained version)."""
        return asdict(self)


def init_kind(init: str) -> tuple[str, str]:
    """Splits an init spec into (kind, argument); ValueError says what is accepted."""
    if init in (INIT_VOCAB, INIT_RANDOM):
        return init, ""
    for prefix in (INIT_TEXT_PREFIX, INIT_FROM_PREFIX):
        if init.startswith(prefix):
            arg = init[len(prefix):].strip()
            if not arg:
                raise ValueError(f"init {init!r} needs something after {prefix!r}")
            return prefix[:-1], arg
    raise ValueError(
        f"init must be 'vocab', 'random', 'text:SOME WORDS' or 'from:TASK[@VERSION]', got {init!r}"
    )


def _at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
