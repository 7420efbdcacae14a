"""One training run end to end: check everything, train, register, and promote through the quality gate.

`plan` does every check that needs no model compute (data, options, names, the warm-start prompt),
so bad input is refused before a job starts. `execute` trains, registers the result with its
report and, if asked, moves an alias only when the new version beats the one it points at on the
same held-out data. The CLI (in-process) and the server's Training service both run this.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from softprompt.prompts.base import BaseModelSpec, spec_of
from softprompt.prompts.data import Example, check_eval_labels, labels_of, split
from softprompt.prompts.errors import InvalidPromptError, RegistryConflictError, TrainingDataError
from softprompt.prompts.format.layout import LOSS_PLOT, TRAINING_REPORT
from softprompt.prompts.format.stored import report_bytes
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.options import TrainingOptions, init_kind
from softprompt.prompts.plot import loss_plot_png
from softprompt.prompts.refs import PromptRef, validate_alias, validate_name
from softprompt.prompts.registry import PromptVersion, Registry
from softprompt.prompts.results import EvalResult, Progress
from softprompt.prompts.train import PromptTrainer, TrainingResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingPlan:
    """A checked training request: what to train on, how, and where the result goes."""

    task: str
    train: list[Example]
    held_out: list[Example]
    options: TrainingOptions
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    promote_alias: str = ""
    warm_start: PromptVersion | None = None


@dataclass(frozen=True)
class Promotion:
    """Whether the alias moved to the new version, and why."""

    promoted: bool
    message: str


@dataclass(frozen=True)
class TrainingOutcome:
    """The registered version, the run's result and the quality gate's decision (if one was asked)."""

    version: PromptVersion
    result: TrainingResult
    promotion: Promotion | None


def plan(
    registry: Registry,
    base: BaseModelSpec,
    task: str,
    train: Sequence[Example],
    held_out: Sequence[Example] | None,
    options: TrainingOptions,
    *,
    description: str = "",
    tags: Mapping[str, str] | None = None,
    promote_alias: str = "",
    max_virtual_tokens: int | None = None,
) -> TrainingPlan:
    """Checks a training request without touching the model; raises a PromptError saying what to fix."""
    validate_name(task)
    if promote_alias:
        validate_alias(promote_alias)
    if max_virtual_tokens is not None and options.num_virtual_tokens > max_virtual_tokens:
        raise InvalidPromptError(
            f"num_virtual_tokens {options.num_virtual_tokens} exceeds this server's limit {max_virtual_tokens}"
        )
    train = list(train)
    if not train:
        raise TrainingDataError("the training data holds no examples")
    if held_out is None:
        train, held = split(train, options.eval_fraction, options.seed)
    else:
        held = list(held_out)
    if not train:
        raise TrainingDataError("no training examples are left after holding some out: give more data")
    check_eval_labels(labels_of(train), held, source="the held-out data")
    if promote_alias and not held:
        raise TrainingDataError(
            f"promoting to @{promote_alias} compares held-out metrics, but there is no held-out data: "
            "give eval data or an eval_fraction > 0"
        )
    warm_start = None
    kind, arg = init_kind(options.init)
    if kind == "from":
        warm_start = registry.resolve(PromptRef.parse(arg))
        if warm_start.hidden_size != base.hidden_size:
            raise InvalidPromptError(
                f"{warm_start.ref} has width {warm_start.hidden_size}, but the base model's hidden size is "
                f"{base.hidden_size}: warm-start from a prompt made for this model"
            )
        if warm_start.num_virtual_tokens != options.num_virtual_tokens:
            raise InvalidPromptError(
                f"{warm_start.ref} has {warm_start.num_virtual_tokens} virtual tokens but "
                f"{options.num_virtual_tokens} were asked for: set num_virtual_tokens to "
                f"{warm_start.num_virtual_tokens} to warm-start from it"
            )
    return TrainingPlan(task, train, held, options, description, dict(tags or {}), promote_alias, warm_start)


def execute(
    p: TrainingPlan,
    trainer: PromptTrainer,
    registry: Registry,
    base: BaseModelSpec,
    *,
    on_phase: Callable[[str], None] = lambda phase: None,
) -> TrainingOutcome:
    """Trains, registers the best prompt with its report, then runs the quality gate if asked."""
    source = None if p.warm_start is None else registry.load_embeddings(p.warm_start)
    init = trainer.initial_prompt(source, init_source="" if p.warm_start is None else p.warm_start.ref)
    result = trainer.fit(p.train, p.held_out, init)
    on_phase("registering")
    report: dict[str, Any] = {
        **result.report(),
        "base_model": {"id": base.model_id, "fingerprint": base.fingerprint},
        "warm_start": None if p.warm_start is None else p.warm_start.ref,
    }
    attachments = {TRAINING_REPORT: report_bytes(report)}
    if result.curve:
        try:
            attachments[LOSS_PLOT] = loss_plot_png(result.curve, title=f"{p.task}: soft-prompt training",
                                                   best_step=result.best_step)
        except ImportError:
            log.warning("matplotlib is not installed, so %s gets no loss plot (pip install matplotlib)", p.task)
    version = registry.register(
        p.task,
        PromptTensor(result.embeddings, source_type="PROMPT_TUNING", init=p.options.init),
        base,
        description=p.description,
        tags=p.tags,
        metrics={} if result.after is None else result.after.metrics(),
        attachments=attachments,
    )
    promotion = None
    if p.promote_alias:
        on_phase("promoting")
        promotion = promote(registry, version, p.promote_alias, result.after, trainer, p.held_out, result.labels)
    return TrainingOutcome(version, result, promotion)


def train_prompt(
    model: Any,
    tokenizer: Any,
    registry: Registry,
    task: str,
    train: Sequence[Example],
    held_out: Sequence[Example] | None = None,
    *,
    options: TrainingOptions | None = None,
    model_id: str = "",
    description: str = "",
    tags: Mapping[str, str] | None = None,
    promote_alias: str = "",
    on_progress: Callable[[Progress], None] | None = None,
) -> TrainingOutcome:
    """Trains a prompt for `task` on a loaded, frozen Hugging Face model and registers it, in one call.

    `held_out` None holds out `options.eval_fraction` of `train`. Example:

        >>> from softprompt.prompts.data import load_jsonl
        >>> outcome = train_prompt(model, tokenizer, Registry("./store"), "sentiment", load_jsonl("train.jsonl"))
        >>> outcome.version.ref, outcome.result.after
    """
    options = options or TrainingOptions()
    model.requires_grad_(False)
    base = spec_of(model, model_id or str(getattr(model.config, "_name_or_path", "") or "unknown"))
    p = plan(registry, base, task, train, held_out, options, description=description, tags=tags,
             promote_alias=promote_alias)
    trainer = PromptTrainer(model, tokenizer, options, on_progress=on_progress)
    return execute(p, trainer, registry, base)


def promote(
    registry: Registry,
    version: PromptVersion,
    alias: str,
    candidate: EvalResult | None,
    trainer: PromptTrainer,
    held_out: Sequence[Example],
    labels: tuple[str, ...] | None,
) -> Promotion:
    """Points ``task@alias`` at `version` only if it beats the current target on the same held-out data."""
    if candidate is None:
        return Promotion(False, f"{version.ref} has no held-out metrics, so @{alias} was left unchanged")
    aliases = registry.store.read_aliases(version.name)
    current = aliases.get(alias)
    why = f"{version.ref} ({_metric_text(candidate)})"
    if current is not None and current != version.version:
        incumbent = registry.resolve(PromptRef(version.name, version=current))
        prompt = registry.load_embeddings(incumbent).to(trainer.device)
        theirs = trainer.evaluate(prompt, trainer.encode(held_out, what="held-out"), labels)
        if candidate.key() <= theirs.key():
            return Promotion(False, f"{why} does not beat {incumbent.ref} ({_metric_text(theirs)}) on the same "
                                    f"held-out data: @{alias} stays on {incumbent.ref}")
        why += f" beats {incumbent.ref} ({_metric_text(theirs)})"
    try:
        registry.set_alias(version.name, alias, version.version, expected=current)
    except RegistryConflictError as e:
        return Promotion(False, f"@{alias} was not moved: {e}")
    return Promotion(True, f"{why}: @{alias} now points at {version.ref}")


def _metric_text(r: EvalResult) -> str:
    main = f"accuracy {r.accuracy:.3f}" if r.accuracy is not None else f"exact match {r.exact_match:.3f}"
    return f"{main}, loss {r.loss:.4f}"
