"""Learns a soft prompt on a frozen base model from input/target examples.

Only the prompt is trained (float32, AdamW); the base model's weights never change. What the prompt is
follows `options.method` (`methods.training`): "prompt" learns `[num_virtual_tokens, hidden]` input
embeddings, "prefix" the keys and values of `num_virtual_tokens` positions in every layer (optionally
through PEFT's reparameterization MLP, materialized at the end). The loss is the cross-entropy of the
target tokens (plus their end token) after `[prompt ; input]`, computed by the method's scoring, which
places the prompt as the server does, so a trained prompt serves exactly as it trained.

Every unit of model work goes through `runner`, a callable that runs a function and returns its
result. In-process training runs units directly; the server passes its scheduler's, which
interleaves them with generation on the one thread that owns the model.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch

from softprompt.prompts import inject
from softprompt.prompts.data import Example, check_eval_labels, data_hash, labels_of
from softprompt.prompts.errors import InvalidPromptError, TrainingDataError
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.base import KvLayout, kv_layout_of
from softprompt.prompts.methods.training import TrainingMethod, method_for
from softprompt.prompts.options import METHOD_PREFIX, TrainingOptions, init_kind
from softprompt.prompts.results import CurvePoint, EvalResult, Progress
from softprompt.prompts.tokens import encode_input, encode_target, target_end_id

log = logging.getLogger(__name__)

T = TypeVar("T")
Runner = Callable[[Callable[[], T]], T]

_EVAL_ROWS = 32  # rows per forward pass when evaluating or scoring
_LOSS_WINDOW = 10  # optimizer steps in the running train loss
_GRAD_CLIP = 1.0


class TrainingCancelled(Exception):
    """The job was cancelled; nothing is to be registered."""


@dataclass
class TrainingResult:
    """What a run produced: the prompt to register and everything recorded with it."""

    embeddings: torch.Tensor  # float32, CPU: the prompt's stored form ([n, hidden], or a prefix's [n, width])
    options: TrainingOptions
    steps: int
    best_step: int
    stop_reason: str  # "completed", "max_steps", "early_stopping" or "interrupted"
    before: EvalResult | None
    after: EvalResult | None
    curve: list[CurvePoint]
    elapsed_seconds: float
    train_examples: int
    eval_examples: int
    train_hash: str
    eval_hash: str
    labels: tuple[str, ...] | None

    def report(self) -> dict[str, Any]:
        """The JSON report stored as training.json next to the registered version."""
        return {
            "options": self.options.to_dict(),
            "steps": self.steps,
            "best_step": self.best_step,
            "stop_reason": self.stop_reason,
            "before": None if self.before is None else asdict(self.before),
            "after": None if self.after is None else asdict(self.after),
            "curve": [asdict(p) for p in self.curve],
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "data": {
                "train_examples": self.train_examples,
                "eval_examples": self.eval_examples,
                "train_sha256": self.train_hash,
                "eval_sha256": self.eval_hash,
                "labels": None if self.labels is None else list(self.labels),
            },
        }


@dataclass(frozen=True)
class _Encoded:
    input_ids: list[int]
    target_ids: list[int]  # ends with end-of-sequence, or the chat template's end of turn
    target: str


def _direct(fn: Callable[[], T]) -> T:
    return fn()


class PromptTrainer:
    """Trains and evaluates prompts for one frozen base model."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        options: TrainingOptions,
        *,
        runner: Runner | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        stop: threading.Event | None = None,
        cancel: threading.Event | None = None,
        max_unit_rows: int = 0,
        kv_layout: KvLayout | None = None,
    ) -> None:
        """`kv_layout` is the model's KV layout if the caller knows it (a server: its `BaseModelSpec`'s);
        otherwise a "prefix" method reads it from the model with a one-token forward through `runner`."""
        self.model = model
        # Rows per unit of work handed to `runner` (0: a whole batch). Splitting a batch changes
        # nothing in the result (gradients add up) but bounds how long one unit holds the model.
        self.max_unit_rows = max_unit_rows
        self.tokenizer = tokenizer
        self.options = options
        self.run: Runner = runner or _direct
        self.on_progress = on_progress
        self.stop = stop or threading.Event()
        self.cancel = cancel or threading.Event()
        # Targets end as Classify scores labels: with the chat template's end of turn in chat mode.
        self.target_end = target_end_id(model, tokenizer, chat=options.apply_chat_template)
        self.embedding = model.get_input_embeddings()
        self.device = self.embedding.weight.device
        self._kv_layout = kv_layout
        self._methods: dict[str, TrainingMethod] = {}
        self.method: TrainingMethod = self._method(options.method)
        max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.max_length = options.max_length
        if max_positions:
            self.max_length = min(self.max_length, max_positions - options.num_virtual_tokens)
        if self.max_length < 2:
            raise TrainingDataError(
                f"{options.num_virtual_tokens} virtual tokens leave no room in the model's {max_positions} positions: "
                "use fewer virtual tokens"
            )

    # ------------------------------------------------------------------ data

    def encode(self, examples: Sequence[Example], *, what: str = "training") -> list[_Encoded]:
        """Tokenizes examples like serving does, cutting inputs (from the end) to fit `max_length`."""
        encoded, cut = [], 0
        for number, ex in enumerate(examples, start=1):
            input_ids = encode_input(self.tokenizer, ex.input, chat=self.options.apply_chat_template)
            target_ids = encode_target(self.tokenizer, ex.target, self.target_end)
            room = self.max_length - len(target_ids)
            if not input_ids and self.method.needs_input():
                raise TrainingDataError(
                    f"{what} example {number}: the input is empty, and a prefix (method 'prefix') has no position "
                    f"whose output predicts the target's first token: give every example some input text"
                )
            if room < 0 or (room == 0 and not input_ids and self.options.num_virtual_tokens == 0):
                raise TrainingDataError(
                    f"{what} example {number}: the target is {len(target_ids)} tokens with its end token, longer "
                    f"than max_length {self.max_length}: raise --max-length or shorten the target"
                )
            if len(input_ids) > room:
                input_ids, cut = input_ids[:room], cut + 1
            encoded.append(_Encoded(input_ids, target_ids, ex.target))
        if cut:
            log.warning("%d of %d %s inputs were cut to fit max_length %d", cut, len(examples), what, self.max_length)
        return encoded

    # ------------------------------------------------------------------ init

    def initial_prompt(self, source: torch.Tensor | None = None, *, init_source: str = "") -> torch.Tensor:
        """The starting prompt for `options.init` (float32, CPU), in the method's stored form; `source` is the
        registered prompt for "from:". "text:" and "vocab" start from tokens: their embeddings for "prompt",
        the keys and values the model computes for them for "prefix"."""
        kind, arg = init_kind(self.options.init)
        n = self.options.num_virtual_tokens
        gen = torch.Generator().manual_seed(self.options.seed)
        if kind == "from":
            if source is None:
                raise ValueError("init 'from:' needs the registered prompt passed as source")
            if source.shape[0] != n:
                raise InvalidPromptError(
                    f"{init_source or arg} has {source.shape[0]} virtual tokens but {n} were asked for: set "
                    f"num_virtual_tokens to {source.shape[0]} to warm-start from it"
                )
            return source.detach().to(device="cpu", dtype=torch.float32).clone()
        if kind == "text":
            ids = list(self.tokenizer(arg, add_special_tokens=False).input_ids)
            if not ids:
                raise TrainingDataError(f"init text {arg!r} has no tokens: give some words")
            ids = (ids * math.ceil(n / len(ids)))[:n]
            # Through the runner: a prefix's start is the keys and values of a forward over these tokens.
            return self.run(lambda: self.method.from_tokens(ids))
        if kind == "vocab":
            special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
            candidates = torch.tensor([i for i in range(self.embedding.weight.shape[0]) if i not in special])
            ids = candidates[torch.randint(len(candidates), (n,), generator=gen)].tolist()
            return self.run(lambda: self.method.from_tokens(ids))
        return self.run(lambda: self.method.random(n, gen))

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, prompt: torch.Tensor | None, examples: Sequence[_Encoded],
                 labels: tuple[str, ...] | None, *, method: str | None = None) -> EvalResult:
        """Held-out loss, exact match and (for classification data) accuracy by scoring every label.

        `prompt` is in the stored form of `method` (default: the one being trained), so a version of
        either method can be judged on the same data (the quality gate); None is the bare model.
        Exact match means greedy decoding reproduces the target exactly (its tokens, then its end
        token): true when every target token is the argmax after the ones before it, so
        the teacher-forced pass that gives the loss decides it too.
        """
        examples = list(examples)
        judged = self._method(method)
        loss, matches, target_scores = self._teacher_forced(prompt, examples, judged)
        accuracy = None
        if labels is not None:
            accuracy = self._accuracy(prompt, examples, labels, target_scores, judged)
        return EvalResult(examples=len(examples), loss=loss, exact_match=matches / max(1, len(examples)),
                          accuracy=accuracy)

    def registered(self, result: TrainingResult) -> PromptTensor:
        """A run's best prompt as the version to register, saved in PEFT's format for its method."""
        return self.method.registered(result.embeddings, result.options.init)

    def _method(self, name: str | None) -> TrainingMethod:
        if name is None:
            return self.method
        if name not in self._methods:
            if name == METHOD_PREFIX and self._kv_layout is None:
                # A forward of the model: model work goes through the runner (a server's worker).
                self._kv_layout = self.run(lambda: kv_layout_of(self.model))
            self._methods[name] = method_for(name, self.model, self._kv_layout)
        return self._methods[name]

    def _teacher_forced(self, prompt: torch.Tensor | None, examples: list[_Encoded],
                        method: TrainingMethod | None = None) -> tuple[float, int, list[float]]:
        """Mean loss per target token, exact matches, and each example's total target log-probability."""
        loss_sum, tokens, matches = 0.0, 0, 0
        target_scores: list[float] = []
        for chunk in _chunks(examples, self._eval_rows):
            scored = self.run(lambda chunk=chunk: self._score(prompt, [(ex, ex.target_ids) for ex in chunk], method))
            totals = scored.totals()
            loss_sum -= float(totals.sum())
            tokens += int(scored.mask.sum())
            matches += int(scored.greedy_rows().sum())
            target_scores.extend(totals.tolist())
        return loss_sum / max(1, tokens), matches, target_scores

    def _accuracy(self, prompt: torch.Tensor | None, examples: list[_Encoded], labels: tuple[str, ...],
                  target_scores: list[float], method: TrainingMethod | None = None) -> float:
        """Share of examples whose target outscores every other label (the target's score is already known)."""
        label_ids = {label: encode_target(self.tokenizer, label, self.target_end) for label in labels}
        rows = [(i, label) for i, ex in enumerate(examples) for label in labels if label != ex.target]
        best_other = [-math.inf] * len(examples)
        for chunk in _chunks(rows, self._eval_rows):
            scored = self.run(lambda chunk=chunk: self._score(
                prompt, [(examples[i], label_ids[lb]) for i, lb in chunk], method))
            for (i, _), value in zip(chunk, scored.totals().tolist()):
                best_other[i] = max(best_other[i], value)
        return sum(t > o for t, o in zip(target_scores, best_other)) / max(1, len(examples))

    def _score(self, prompt: torch.Tensor | None, rows: list[tuple[_Encoded, list[int]]],
               method: TrainingMethod | None = None) -> inject.Continuations:
        self._check_cancel()
        contexts, continuations = [ex.input_ids for ex, _ in rows], [cont for _, cont in rows]
        with torch.inference_mode():
            if prompt is None:  # the bare model
                return inject.score_continuations(self.model, [None] * len(rows), contexts, continuations)
            return (method or self.method).score(self.model, prompt, contexts, continuations)

    # ------------------------------------------------------------------ training

    def fit(self, train: Sequence[Example], held_out: Sequence[Example], init: torch.Tensor) -> TrainingResult:
        """Trains from `init`; returns the prompt with the best held-out loss (the last one without held-out data).

        Setting `stop` ends training early and keeps the best prompt so far; setting `cancel` raises
        `TrainingCancelled` at the next unit of work.
        """
        o = self.options
        started = time.monotonic()
        labels = labels_of(list(train))
        check_eval_labels(labels, list(held_out), source="the held-out data")
        train_enc = self.encode(train)
        eval_enc = self.encode(held_out, what="held-out")
        if not train_enc:
            raise TrainingDataError("no training examples: give at least one")

        per_step = o.batch_size * o.grad_accum
        steps_per_epoch = math.ceil(len(train_enc) / per_step)
        total = steps_per_epoch * o.epochs
        if o.max_steps:
            total = min(total, o.max_steps)
        eval_every = o.eval_every or steps_per_epoch
        state = _RunState(started=started, total=total, steps_per_epoch=steps_per_epoch)

        prompt = self.method.learnable(init.detach().to(device=self.device, dtype=torch.float32), o)
        optimizer = torch.optim.AdamW(list(prompt.parameters()), lr=o.learning_rate, weight_decay=0.0)
        before = None
        if eval_enc:
            self._report("evaluating", state)
            before = self.evaluate(self._current(prompt), eval_enc, labels)
            state.best_loss = before.loss
            state.curve.append(CurvePoint(0, None, before.loss))
            log.info("before training: %s", before.describe())
        best = prompt.materialize()
        order_gen = torch.Generator().manual_seed(o.seed)

        stop_reason = "completed"
        while state.step < total and stop_reason == "completed":
            order = torch.randperm(len(train_enc), generator=order_gen).tolist()
            micro = [[train_enc[i] for i in order[k:k + o.batch_size]] for k in range(0, len(order), o.batch_size)]
            for first in range(0, len(micro), o.grad_accum):
                if self.stop.is_set():
                    stop_reason = "interrupted"
                    break
                self._check_cancel()
                group = micro[first:first + o.grad_accum]
                loss = self._optimizer_step(prompt, optimizer, group, state.step)
                state.step += 1
                state.losses.append(loss)
                eval_loss = None
                if eval_enc and (state.step % eval_every == 0 or state.step == total):
                    self._report("evaluating", state)
                    eval_loss = self._teacher_forced(self._current(prompt), eval_enc)[0]
                    state.last_eval = eval_loss
                    if state.best_loss is None or eval_loss < state.best_loss:
                        state.best_loss, state.best_step, state.bad_evals = eval_loss, state.step, 0
                        best = prompt.materialize()
                    else:
                        state.bad_evals += 1
                state.curve.append(CurvePoint(state.step, state.train_loss, eval_loss))
                self._report("training", state)
                if state.step >= total:
                    stop_reason = "max_steps" if o.max_steps and total == o.max_steps else "completed"
                    break
                if o.patience and state.bad_evals >= o.patience:
                    stop_reason = "early_stopping"
                    break
        if not eval_enc:
            best, state.best_step = prompt.materialize(), state.step

        after = None
        if eval_enc:
            self._report("evaluating", state)
            after = self.evaluate(best.to(self.device), eval_enc, labels)
            log.info("after training (step %d of %d, %s): %s", state.best_step, state.step, stop_reason,
                     after.describe())
        return TrainingResult(
            embeddings=best,
            options=o,
            steps=state.step,
            best_step=state.best_step,
            stop_reason=stop_reason,
            before=before,
            after=after,
            curve=state.curve,
            elapsed_seconds=time.monotonic() - started,
            train_examples=len(train_enc),
            eval_examples=len(eval_enc),
            train_hash=data_hash(list(train)),
            eval_hash=data_hash(list(held_out)),
            labels=labels,
        )

    @staticmethod
    def _current(prompt: torch.nn.Module) -> torch.Tensor:
        """The prompt being learned as it is now, in its stored form, without gradients."""
        with torch.no_grad():
            return prompt().detach()

    def _optimizer_step(self, prompt: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        group: list[list[_Encoded]], step: int) -> float:
        o = self.options
        lr = o.learning_rate * min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else o.learning_rate
        for g in optimizer.param_groups:
            g["lr"] = lr
        tokens = sum(len(ex.target_ids) for batch in group for ex in batch)
        loss = 0.0
        for batch in group:
            for unit in _chunks(batch, self.max_unit_rows or len(batch)):
                loss += self.run(lambda unit=unit: self._backward(prompt, unit, tokens))

        def update() -> None:
            torch.nn.utils.clip_grad_norm_(list(prompt.parameters()), _GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.run(update)
        return loss

    def _backward(self, prompt: torch.nn.Module, batch: list[_Encoded], tokens: int) -> float:
        with torch.enable_grad():
            scored = self.method.score(self.model, prompt(), [ex.input_ids for ex in batch],
                                       [ex.target_ids for ex in batch])
            loss = -scored.totals().sum() / tokens
            loss.backward()
        return float(loss.detach())

    @property
    def _eval_rows(self) -> int:
        # Inference rows cost about a third of training rows (no backward pass).
        return min(_EVAL_ROWS, 3 * self.max_unit_rows) if self.max_unit_rows else _EVAL_ROWS

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise TrainingCancelled("training was cancelled")

    def _report(self, phase: str, state: _RunState) -> None:
        if self.on_progress is None:
            return
        elapsed = time.monotonic() - state.started
        self.on_progress(Progress(
            phase=phase,
            step=state.step,
            total_steps=state.total,
            epoch=state.step / state.steps_per_epoch,
            train_loss=state.train_loss if state.losses else None,
            eval_loss=state.last_eval,
            best_eval_loss=state.best_loss,
            steps_per_second=state.step / elapsed if elapsed > 0 else 0.0,
            elapsed_seconds=elapsed,
        ))


@dataclass
class _RunState:
    started: float
    total: int
    steps_per_epoch: int
    step: int = 0
    best_step: int = 0
    best_loss: float | None = None
    last_eval: float | None = None
    bad_evals: int = 0
    losses: deque[float] = field(default_factory=lambda: deque(maxlen=_LOSS_WINDOW))
    curve: list[CurvePoint] = field(default_factory=list)

    @property
    def train_loss(self) -> float:
        return sum(self.losses) / max(1, len(self.losses))


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]
