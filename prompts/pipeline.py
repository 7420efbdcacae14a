"""One training run end to end: check everything, train, judge through the quality gate, register, promote.

`plan` does every check that needs no model compute (data, options, names, the warm-start prompt),
so bad input is refused before a job starts. `execute` trains and, if asked to promote to an alias, runs
the quality gate: the new prompt must beat the version the alias points at on the same held-out data.
It then registers the result with its report, and moves the alias only when the prompt won.

A prompt the gate turns down is registered as a *candidate*: kept, named (`task@N`), exportable, but never
what the bare task name means. A team that sends production traffic to the bare name gates its training
runs with --promote, and expects a rejected run to change nothing that traffic sees; a version that wins,
or a run without a gate, becomes the bare name's newest version as any registration does.
The CLI (in-process) and the server's Training service both run this.
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
from softprompt.prompts.format.tensor import check_base_model
from softprompt.prompts.options import METHOD_PREFIX, TrainingOptions, init_kind
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
class Verdict:
    """The quality gate's judgement of a trained prompt, before it is registered."""

    alias: str
    wins: bool
    current: int | None  # the version the alias pointed at when judged (None: no such alias yet)
    why: str  # the comparison, e.g. "(accuracy 0.900, loss 0.31) beats sent@1 (accuracy 0.700, loss 0.52)"


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
    if options.method == METHOD_PREFIX and base.kv_layout is None:
        raise InvalidPromptError(
            f"{base.model_id} does not cache keys and values of one shape in every layer, so it cannot learn a "
            f"prefix: train with method 'prompt'"
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
        if warm_start.method != options.method:
            raise InvalidPromptError(
                f"{warm_start.ref} is a {warm_start.method}-tuned prompt but method {options.method!r} was asked "
                f"for: warm-start from a version of the same method, or train with method {warm_start.method!r}"
            )
        check_base_model(warm_start, base, force=True)  # a prefix's layers, KV heads and head size
    return TrainingPlan(task, train, held, options, description, dict(tags or {}), promote_alias, warm_start)


def execute(
    p: TrainingPlan,
    trainer: PromptTrainer,
    registry: Registry,
    base: BaseModelSpec,
    *,
    on_phase: Callable[[str], None] = lambda phase: None,
) -> TrainingOutcome:
    """Trains, runs the quality gate if asked, registers the best prompt with its report (a candidate if the
    gate turned it down), then moves the alias if it won."""
    source = None if p.warm_start is None else registry.load_embeddings(p.warm_start)
    init = trainer.initial_prompt(source, init_source="" if p.warm_start is None else p.warm_start.ref)
    result = trainer.fit(p.train, p.held_out, init)
    verdict = None
    if p.promote_alias:
        on_phase("promoting")
        verdict = judge(registry, p.task, p.promote_alias, result.after, trainer, p.held_out, result.labels)
    on_phase("registering")
    report: dict[str, Any] = {
        **result.report(),
        "base_model": {"id": base.model_id, "fingerprint": base.fingerprint},
        "warm_start": None if p.warm_start is None else p.warm_start.ref,
        "quality_gate": None if verdict is None else {"alias": verdict.alias, "passed": verdict.wins,
                                                      "compared": verdict.why},
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
        trainer.registered(result),  # in PEFT's format for its method (PROMPT_TUNING or PREFIX_TUNING)
        base,
        description=p.description,
        tags=p.tags,
        metrics={} if result.after is None else result.after.metrics(),
        attachments=attachments,
        candidate=verdict is not None and not verdict.wins,
    )
    promotion = None if verdict is None else promote(registry, version, verdict)
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
    trainer = PromptTrainer(model, tokenizer, options, on_progress=on_progress, kv_layout=base.kv_layout)
    return execute(p, trainer, registry, base)


def judge(
    registry: Registry,
    task: str,
    alias: str,
    candidate: EvalResult | None,
    trainer: PromptTrainer,
    held_out: Sequence[Example],
    labels: tuple[str, ...] | None,
) -> Verdict:
    """Whether a trained prompt (held-out metrics `candidate`) beats ``task@alias`` on the same held-out data."""
    current = registry.store.read_aliases(task).get(alias)
    if candidate is None:
        return Verdict(alias, False, current, "has no held-out metrics to compare")
    why = f"({_metric_text(candidate)})"
    if current is None:
        return Verdict(alias, True, None, why)
    incumbent = registry.resolve(PromptRef(task, version=current))
    prompt = registry.load_embeddings(incumbent).to(trainer.device)
    theirs = trainer.evaluate(prompt, trainer.encode(held_out, what="held-out"), labels, method=incumbent.method)
    wins = candidate.key() > theirs.key()
    why += f" {'beats' if wins else 'does not beat'} {incumbent.ref} ({_metric_text(theirs)}) on the same held-out data"
    return Verdict(alias, wins, current, why)


def promote(registry: Registry, version: PromptVersion, verdict: Verdict) -> Promotion:
    """Points ``task@alias`` at the just registered `version` if it won the gate; says why either way."""
    alias, target = verdict.alias, f"{version.name}@{verdict.alias}"
    if not verdict.wins:
        stays = f"@{alias} stays on {version.name}@{verdict.current}" if verdict.current else f"@{alias} was left unset"
        return Promotion(False, f"{version.ref} {verdict.why}: {stays}; {version.ref} is a candidate, which the "
                                f"bare name {version.name!r} does not serve")
    try:
        registry.set_alias(version.name, alias, version.version, expected=verdict.current)
    except RegistryConflictError as e:
        return Promotion(False, f"@{alias} was not moved: {e}")
    return Promotion(True, f"{version.ref} {verdict.why}: {target} now points at {version.ref}")


def _metric_text(r: EvalResult) -> str:
    main = f"accuracy {r.accuracy:.3f}" if r.accuracy is not None else f"exact match {r.exact_match:.3f}"
    return f"{main}, loss {r.loss:.4f}"
