"""How the commands print results: JSON, aligned tables and fields, summaries, the progress line.

Results go to stdout and metadata (summaries, progress) to stderr, so that stdout pipes cleanly.
Finish reasons and job states print as their plain string values, whether they arrive as `str` or
as the `str` enums of `softprompt.prompts.outcomes`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from softprompt.client.types import (
    CacheTier,
    ClassifyResult,
    EvalMetrics,
    KvCache,
    ModelInfo,
    PromptInfo,
    TaskLoad,
    TrainingJob,
    Usage,
)

# ---------------------------------------------------------------------- generic


def print_json(value: Any) -> None:
    """Prints `value` (a result dataclass, a list of them, or plain data) as indented JSON."""
    print(json.dumps(_jsonable(value), indent=2, ensure_ascii=False))


def print_json_line(value: Any) -> None:
    """Prints `value` as one line of JSON and flushes, for a stream of results."""
    print(json.dumps(_jsonable(value), ensure_ascii=False), flush=True)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Prints `rows` under `headers` in left-aligned columns."""
    print_rows(column_widths(headers, rows), [headers, *rows])


def column_widths(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    """The width of each column that fits `headers` and `rows` (a table printed in pages: its first page's)."""
    return [max(len(str(c)) for c in column) for column in zip(headers, *rows)]


def print_rows(widths: Sequence[int], rows: Sequence[Sequence[str]]) -> None:
    """Prints `rows` left-aligned in columns of `widths` (a longer cell pushes the rest of its row right)."""
    for row in rows:
        cells = [str(c).ljust(w) for c, w in zip(row, widths)]
        print("  ".join(cells).rstrip())


def print_fields(fields: Sequence[tuple[str, Any]]) -> None:
    """Prints one `name  value` line per field, the values aligned."""
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name.ljust(width)}  {value}")


# ---------------------------------------------------------------------- inference


def print_summary(prompt_version: str, finish_reason: str | None, usage: Usage | None) -> None:
    """Prints a generation's version, finish reason and token counts to stderr."""
    # Metadata goes to stderr so that stdout holds exactly the generated text (pipe-friendly).
    parts = [prompt_version or "base model", f"finish: {finish_reason or 'unknown'}"]
    if usage is not None:
        parts.append(
            f"tokens: {usage.input_tokens} input + {usage.virtual_tokens} virtual, "
            f"{usage.generated_tokens} generated"
        )
    print(f"[{'; '.join(parts)}]", file=sys.stderr)


def print_scores(result: ClassifyResult) -> None:
    """Prints the labels, most likely first and the best marked, then a summary to stderr."""
    ranked = sorted(result.scores, key=lambda s: s.probability, reverse=True)
    rows = [
        ("*" if s.label == result.label else "", s.label, f"{s.probability:.4f}", f"{s.logprob:.4f}",
         str(s.num_tokens))
        for s in ranked
    ]
    print_table(("", "LABEL", "PROBABILITY", "LOGPROB", "TOKENS"), rows)
    print(
        f"[{result.prompt_version or 'base model'}; tokens: {result.input_tokens} input + "
        f"{result.virtual_tokens} virtual]",
        file=sys.stderr,
    )


def print_model(m: ModelInfo) -> None:
    """Prints the base model's description and the server's limits."""
    limits = m.limits
    print_fields(
        [
            ("model", m.model_id),
            ("fingerprint", m.fingerprint),
            ("hidden size", m.hidden_size),
            ("dtype", m.dtype),
            ("device", m.device),
            ("max sequence length", m.max_sequence_length),
            ("vocab size", m.vocab_size),
            ("chat template", "yes" if m.has_chat_template else "no"),
            ("max new tokens", f"{limits.max_new_tokens} (default {limits.default_max_new_tokens})"),
            ("max input tokens", limits.max_input_tokens),
            ("max virtual tokens", limits.max_virtual_tokens),
            ("max batch size", limits.max_batch_size),
            ("max queued requests", limits.max_queued_requests),
            ("max upload bytes", limits.max_upload_bytes),
            ("max stop sequences", limits.max_stop_sequences or "not reported"),
            ("max labels", limits.max_labels or "not reported"),
            ("kv cache", "not reported" if m.kv_cache is None else kv_cache_line(m.kv_cache)),
            *((f"{tier.name} cache", cache_tier_line(tier)) for tier in m.caches),
        ]
    )


TASK_COLUMNS = ("TASK", "RUNNING", "QUEUED", "SHARE", "FAIR SHARE", "WEIGHT", "PRIORITY", "TOKENS/S", "REFUSED")


def print_tasks(tasks: Sequence[TaskLoad]) -> None:
    """Each task's rows, queue, share of the batch against its fair share, and token rate (`top`, `info`)."""
    if not tasks:
        print("no task busy now or lately")
        return
    print_table(TASK_COLUMNS, [
        (t.task, str(t.running), str(t.queued), f"{t.share:.0%}", f"{t.fair_share:.0%}", f"{t.weight:g}",
         str(t.priority), f"{t.tokens_per_second:,.0f}", str(t.refused))
        for t in sorted(tasks, key=lambda t: (-t.running, -t.queued, -t.tokens_per_second, t.task))])


def kv_cache_line(kv: KvCache) -> str:
    """The KV cache in one line: `1.2 GiB, 75,000 tokens (4,687 blocks of 16), 3% used, 2 rows`."""
    gib = kv.total_bytes / (1 << 30)
    size = f"{gib:.1f} GiB" if gib >= 1 else f"{kv.total_bytes / (1 << 20):.0f} MiB"
    used = kv.used_blocks / kv.total_blocks if kv.total_blocks else 0.0
    return (f"{size}, {kv.total_tokens:,} tokens ({kv.total_blocks:,} blocks of {kv.block_size}), {used:.0%} used, "
            f"{kv.rows} {'row' if kv.rows == 1 else 'rows'}")


def cache_tier_line(tier: CacheTier) -> str:
    """A tier of prompt memory in one line: `1,204 entries, 37 MiB of 2,048 MiB, 96% hits, 3 evictions`."""
    line = (f"{tier.entries:,} entries, {tier.bytes / (1 << 20):,.0f} MiB of {tier.capacity_bytes / (1 << 20):,.0f} "
            f"MiB, {tier.hit_rate:.0%} hits ({tier.hits:,} of {tier.hits + tier.misses:,}), {tier.evictions:,} evicted")
    return line + (f", {tier.pending:,} still loading" if tier.pending else "")


# ---------------------------------------------------------------------- prompts

PROMPT_COLUMNS = ("REF", "TYPE", "TOKENS", "HIDDEN", "ALIASES", "CREATED", "DESCRIPTION")


def prompt_row(p: PromptInfo) -> tuple[str, ...]:
    """`p` as a row under PROMPT_COLUMNS."""
    return (
        f"{p.ref} (candidate)" if p.candidate else p.ref,
        p.peft_type,
        str(p.num_virtual_tokens),
        str(p.hidden_size),
        ",".join(p.aliases) or "-",
        p.created_at,
        p.description,
    )


def print_prompt(p: PromptInfo) -> None:
    """Prints every field of prompt version `p`."""
    print_fields(
        [
            ("ref", p.ref),
            *([("candidate", "yes: its quality gate kept the alias on another version, so the bare name "
                             f"{p.name!r} does not serve it")] if p.candidate else []),
            ("type", p.peft_type),
            ("method", _method_text(p)),
            ("virtual tokens", p.num_virtual_tokens),
            ("hidden size", p.hidden_size),
            ("bytes", f"{p.size_bytes:,}" if p.size_bytes else "-"),
            ("aliases", ", ".join(p.aliases) or "-"),
            ("created", p.created_at),
            ("description", p.description or "-"),
            ("tags", ", ".join(f"{k}={v}" for k, v in sorted(p.tags.items())) or "-"),
            ("base model", p.base_model_fingerprint or "-"),
            ("sha256", p.sha256),
            *([("metrics", _metrics_text(p.metrics))] if p.metrics else []),
        ]
    )


def _method_text(p: PromptInfo) -> str:
    """"prefix: 30 layers x 3 KV heads x 64" / "prompt: input embeddings" (servers before methods: "prompt")."""
    if p.method == "prefix":
        return f"prefix: keys and values, {p.num_layers} layers x {p.kv_heads} KV heads x head size {p.head_dim}"
    task = f" (task {p.peft_task_id} of a multitask adapter)" if p.peft_task_id is not None else ""
    return f"prompt: input embeddings{task}"


def _metrics_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items()))


# ---------------------------------------------------------------------- training jobs

JOB_COLUMNS = ("JOB", "TASK", "STATE", "STEP", "EVAL LOSS", "VERSION", "CREATED")
_METRIC_COLUMNS = ("HELD-OUT", "EXAMPLES", "LOSS", "EXACT MATCH", "ACCURACY")


def job_row(job: TrainingJob) -> tuple[str, ...]:
    """`job` as a row under JOB_COLUMNS."""
    p = job.progress
    return (
        job.job_id,
        job.task,
        str(job.state),
        f"{p.step}/{p.total_steps}",
        "-" if p.eval_loss is None else f"{p.eval_loss:.4f}",
        job.version.ref if job.version else "-",
        job.created_at,
    )


def print_job(job: TrainingJob) -> None:
    """Prints a training job's fields, then its held-out metrics before and after, if measured."""
    p = job.progress
    fields: list[tuple[str, Any]] = [
        ("job", job.job_id),
        ("task", job.task),
        ("state", job.state if job.done or not job.phase else f"{job.state} ({job.phase})"),
        ("created", job.created_at),
        ("finished", job.finished_at or "-"),
        ("examples", f"{job.train_examples} training, {job.eval_examples} held-out"),
        ("progress", f"step {p.step}/{p.total_steps}, epoch {p.epoch:.2f}, "
                     f"{_duration(p.elapsed_seconds)}"),
        ("train loss", f"{p.train_loss:.4f}"),
        ("eval loss", "-" if p.eval_loss is None else
                      f"{p.eval_loss:.4f} (best {p.best_eval_loss:.4f})"),
        ("version", job.version.ref if job.version else "-"),
    ]
    if job.promoted or job.promotion:
        fields.append(("promotion", f"{'promoted' if job.promoted else 'not promoted'}: {job.promotion}"))
    if job.error:
        fields.append(("error", job.error))
    print_fields(fields)
    measured = [(name, m) for name, m in (("before", job.before), ("after", job.after)) if m]
    if measured:
        print()
        print_table(_METRIC_COLUMNS, [_metrics_row(name, m) for name, m in measured])


def _metrics_row(name: str, m: EvalMetrics) -> tuple[str, ...]:
    accuracy = "-" if m.accuracy is None else f"{m.accuracy:.4f}"
    return (name, str(m.examples), f"{m.loss:.4f}", f"{m.exact_match:.4f}", accuracy)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _progress_text(job: TrainingJob) -> str:
    p = job.progress
    parts = [job.phase or str(job.state)]
    if p.total_steps:
        parts.append(f"step {p.step}/{p.total_steps}")
    if p.step:
        parts.append(f"loss {p.train_loss:.4f}")
    if p.eval_loss is not None:
        parts.append(f"eval loss {p.eval_loss:.4f}")
    if p.steps_per_second:
        parts.append(f"{p.steps_per_second:.2f} steps/s")
    if p.elapsed_seconds:
        parts.append(_duration(p.elapsed_seconds))
    return "  ".join(parts)


class ProgressLine:
    """Shows a training job's progress: one line rewritten in place on a terminal, else a few plain lines.

    Without a terminal (a log file, a pipe) it prints a line the first time the job enters each stage
    (queued, training, evaluating, ..., done), not a line per step: redirected output stays a short summary.
    With `interval`, it prints on every change of stage instead, and within one stage at most every
    `interval` seconds.

    Use it as a context manager: leaving it ends the terminal line, so that what follows (a result,
    an error, the Ctrl-C notice) starts on a fresh one.
    """

    def __init__(
        self,
        stream: TextIO,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._interval = interval
        self._clock = clock
        self._width = 0  # length of the line on screen (terminal only)
        self._last: tuple[str, str, float] | None = None  # (stage, text, time) printed last
        self._seen: set[str] = set()  # stages printed (no terminal)

    def update(self, job: TrainingJob) -> None:
        """Shows `job`'s progress (without a terminal: see the class)."""
        text = _progress_text(job)
        if self._tty:
            # Pad to the previous line's length so that no characters of it remain.
            self._stream.write("\r" + text.ljust(self._width))
            self._stream.flush()
            self._width = len(text)
            return
        stage, now = f"{job.state}/{job.phase}", self._clock()
        if self._last is not None:
            last_stage, last_text, last_time = self._last
            if text == last_text:
                return
            if self._interval is None and stage in self._seen:
                return  # a summary: each stage once (training and evaluating alternate all run long)
            if self._interval is not None and stage == last_stage and now - last_time < self._interval:
                return
        print(text, file=self._stream, flush=True)
        self._last = (stage, text, now)
        self._seen.add(stage)

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()
