"""Turns a GenerationRequest into an engine row: checks its fields, resolves its prompt, tokenizes.

Everything that can be refused is refused here, in the caller's thread, before the request takes a
queue slot, so a bad request costs the model nothing and gets a message saying what to fix.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

from softprompt.prompts.format.tensor import check_base_model
from softprompt.prompts.registry import Registry
from softprompt.prompts.tokens import encode_input, encode_messages, encode_target, target_end_id
from softprompt.server.access.callers import Principal
from softprompt.server.config import ServerConfig
from softprompt.server.core import omp
from softprompt.server.core.engine import Engine, Sequence
from softprompt.server.core.errors import InvalidRequestError
from softprompt.server.core.prompt_cache import Key, PromptCache
from softprompt.server.core.virtual import KvPrefix, Prompt, virtual_tokens
from softprompt.prompts.options import MAX_STOP_CHARS, DecodingOptions
from softprompt.server.core.types import ClassifyRequest, ClassifyResult, GenerationRequest, LabelScore, Tokenization

@dataclass
class Admitted:
    """A request ready for the scheduler: its row plus what its responses report."""

    sequence: Sequence
    prompt_version: str
    deadline: float | None
    priority: int | None = None  # as asked (None: the task's default); fair share checks and applies it
    principal: Principal = Principal()


@dataclass
class AdmittedScoring:
    """A Classify request ready for the scheduler: one scoring row per label."""

    request: ClassifyRequest
    prompt: Prompt | None
    input_ids: list[int]
    label_ids: list[list[int]]
    prompt_version: str
    prompt_key: Key | None = None  # the prompt's prefix KV is cached under this key

    @property
    def deadline(self) -> float | None:
        """When the client stops waiting (time.monotonic())."""
        return self.request.deadline

    def result(self, logprobs: list[float]) -> ClassifyResult:
        """Each label's score (probabilities normalised over the candidates) and the most likely label."""
        top = max(logprobs)
        weights = [math.exp(lp - top) for lp in logprobs]
        total = sum(weights)
        scores = tuple(
            LabelScore(label, lp, w / total, len(ids))
            for label, lp, w, ids in zip(self.request.labels, logprobs, weights, self.label_ids)
        )
        virtual = virtual_tokens(self.prompt)
        best = max(scores, key=lambda x: x.logprob).label
        return ClassifyResult(scores, best, self.prompt_version, len(self.input_ids), virtual)


class Admission:
    """Validates requests against the server's limits and the base model."""

    def __init__(self, engine: Engine, registry: Registry, prompts: PromptCache, config: ServerConfig) -> None:
        self.engine = engine
        self.registry = registry
        self.prompts = prompts
        self.config = config
        self._ids = itertools.count(1)
        self._label_end: dict[bool, int] = {}  # the id ending labels, without and with the chat template

    def admit(self, request: GenerationRequest) -> Admitted:
        """Builds the engine row for a request, or raises a ServingError / PromptError."""
        params = self.check_decoding(request.options)
        prompt, version, key = self.resolve(request.task)
        if request.messages:
            input_ids = encode_messages(self.engine.tokenizer, request.messages)
        else:
            input_ids = list(self.tokenize(request.input, chat=request.options.chat).token_ids)
        self._check_lengths(input_ids, prompt, params.max_new_tokens, fix="lower max_new_tokens",
                            empty_text=not request.messages and not request.input)
        seq = Sequence(request_id=next(self._ids), input_ids=input_ids, params=params, prompt=prompt, prompt_key=key)
        # The last step's KV included.
        self._check_fits_pool(seq.num_virtual_tokens, len(input_ids), params.max_new_tokens, fix="lower max_new_tokens")
        self.engine.start(seq)
        omp.release_pool()  # a transport's thread: its tensor work (a prompt loaded) must not slow the worker's
        return Admitted(sequence=seq, prompt_version=version, deadline=request.deadline, priority=request.priority,
                        principal=request.principal)

    def admit_classify(self, request: ClassifyRequest) -> AdmittedScoring:
        """Checks a Classify request's labels and lengths, resolves its prompt and tokenizes."""
        labels = request.labels
        if len(labels) < 2:
            raise InvalidRequestError(f"give at least two candidate labels to choose between, got {len(labels)}")
        if len(labels) > self.config.max_labels:
            raise InvalidRequestError(f"{len(labels)} labels given; this server scores at most {self.config.max_labels}")
        if any(not label.strip() for label in labels):
            raise InvalidRequestError("labels must not be empty or blank")
        if len(set(labels)) != len(labels):
            raise InvalidRequestError(f"labels must be distinct: {sorted({x for x in labels if labels.count(x) > 1})}")
        prompt, version, key = self.resolve(request.task)
        input_ids = list(self.tokenize(request.input, chat=request.chat).token_ids)
        end = self.label_end(chat=request.chat)
        label_ids = [encode_target(self.engine.tokenizer, label, end) for label in labels]
        longest = max(len(ids) for ids in label_ids)
        self._check_lengths(input_ids, prompt, longest, fix="use shorter labels", empty_text=not request.input)
        self._check_fits_pool(virtual_tokens(prompt), len(input_ids), longest, fix="use shorter labels")
        omp.release_pool()
        return AdmittedScoring(request, prompt, input_ids, label_ids, version, key)

    def label_end(self, *, chat: bool) -> int:
        """The id scored after each label: the chat template's end of turn in chat mode, as training ends targets."""
        if chat not in self._label_end:
            self._label_end[chat] = target_end_id(self.engine.model, self.engine.tokenizer, chat=chat)
        return self._label_end[chat]

    def check_decoding(self, o: DecodingOptions) -> DecodingOptions:
        """Checks decoding options against the limits and fills in defaults."""
        cfg = self.config
        if o.max_new_tokens > cfg.max_new_tokens:
            raise InvalidRequestError(
                f"max_new_tokens {o.max_new_tokens} exceeds this server's limit {cfg.max_new_tokens}; ask for fewer",
                field="max_new_tokens",
            )
        if not math.isfinite(o.temperature) or o.temperature < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0 (0 = greedy), got {o.temperature}")
        if o.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 = off), got {o.top_k}")
        if not math.isfinite(o.top_p) or not 0.0 <= o.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be within [0, 1] (0 or 1 = off), got {o.top_p}")
        if len(o.stop) > cfg.max_stop_sequences:
            raise InvalidRequestError(f"{len(o.stop)} stop sequences given; at most {cfg.max_stop_sequences} are allowed")
        for s in o.stop:
            if not s or len(s) > MAX_STOP_CHARS:
                raise InvalidRequestError(f"each stop sequence must be 1..{MAX_STOP_CHARS} characters, got {s!r:.40}")
        return dataclasses.replace(o, max_new_tokens=o.max_new_tokens or cfg.default_max_new_tokens)

    def resolve(self, task: str) -> tuple[Prompt | None, str, Key | None]:
        """A task reference's prompt on the device (its tensor cached), its version ("name@3") and cache key
        ('' is the bare model: no prompt). A prefix-tuned version's prompt is its keys and values per layer
        (`KvPrefix`, views of the cached tensor); any other's, its virtual-token embeddings."""
        if not task:
            return None, "", None
        version = self.registry.resolve(task)
        check_base_model(version, self.engine.base.spec)
        key = (version.name, version.version, version.sha256)
        tensor = self.prompts.get(key, lambda: self.registry.load_embeddings(version))
        if version.method == "prefix":
            return KvPrefix.of(tensor, self.engine.pool.layers), version.ref, key
        return tensor, version.ref, key

    def tokenize(self, text: str, *, chat: bool = False) -> Tokenization:
        """Tokenizes like generation does: the chat template if asked, else the tokenizer's defaults."""
        tokenizer = self.engine.tokenizer
        ids = encode_input(tokenizer, text, chat=chat)
        return Tokenization(token_ids=tuple(ids), tokens=tuple(tokenizer.convert_ids_to_tokens(ids)))

    def _check_fits_pool(self, virtual: int, input_tokens: int, new_tokens: int, *, fix: str) -> None:
        """Refuses a request whose KV could never fit the pool, even alone: it would wait forever."""
        need = virtual + input_tokens + new_tokens
        capacity = self.engine.kv.capacity_tokens
        if need > capacity:
            raise InvalidRequestError(
                f"{virtual} virtual + {input_tokens} input + {new_tokens} new tokens = {need} exceeds this "
                f"server's KV cache of {capacity} tokens (--kv-cache-memory): shorten the input or {fix}"
            )

    def _check_lengths(self, input_ids: list[int], prompt: Prompt | None, new_tokens: int, *, fix: str,
                       empty_text: bool = False) -> None:
        virtual = virtual_tokens(prompt)
        if not input_ids and isinstance(prompt, KvPrefix):
            raise InvalidRequestError(
                "input is empty: a prefix-tuned task's prompt is keys and values, with no virtual token whose "
                "output predicts the first token, so it needs at least one input token: give some text",
                field="input",
            )
        if not input_ids or empty_text:
            # One rule for every task and transport (README): no text, no request. A soft prompt's last virtual
            # token could predict a first token, but an empty input is almost always a caller's mistake.
            raise InvalidRequestError("input is empty: give some text", field="input")
        if len(input_ids) > self.config.max_input_tokens:
            raise InvalidRequestError(
                f"input has {len(input_ids)} tokens; this server accepts at most {self.config.max_input_tokens}: "
                "shorten it"
            )
        total = virtual + len(input_ids) + new_tokens
        limit = self.engine.base.max_sequence_length
        if total > limit:
            raise InvalidRequestError(
                f"{virtual} virtual + {len(input_ids)} input + {new_tokens} new tokens = {total} exceeds "
                f"the model's maximum sequence length {limit}: shorten the input or {fix}"
            )
