"""Training data: JSONL examples `{"input": ..., "target": ...}`, checked line by line before any compute."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from softprompt.prompts.errors import TrainingDataError

_KEYS = (("input", "target"), ("input_text", "target_text"))
_MAX_ERRORS_SHOWN = 5
# Data looks like classification when it has few distinct targets, each seen several times.
MAX_LABELS = 20


@dataclass(frozen=True)
class Example:
    """One training pair: the model should produce `target` after `input`."""

    input: str
    target: str


def parse_jsonl(data: bytes | str, *, source: str) -> list[Example]:
    """Parses JSONL; `TrainingDataError` lists the first bad lines by number (1-based) and says why."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TrainingDataError(f"{source} is not UTF-8 text (byte {e.start}): save it as UTF-8 JSONL") from None
    examples, errors = [], []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            examples.append(_parse_line(line))
        except ValueError as e:
            errors.append(f"line {number}: {e}")
    if errors:
        shown = "; ".join(errors[:_MAX_ERRORS_SHOWN])
        more = f" (and {len(errors) - _MAX_ERRORS_SHOWN} more bad lines)" if len(errors) > _MAX_ERRORS_SHOWN else ""
        raise TrainingDataError(f"{source}: {shown}{more}. Each line must be one JSON object "
                                '{"input": "...", "target": "..."}')
    if not examples:
        raise TrainingDataError(f'{source} holds no examples: give one JSON object {{"input": ..., "target": ...}} a line')
    return examples


def _parse_line(line: str) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    found = [keys for keys in _KEYS if keys[0] in obj or keys[1] in obj]
    if len(found) != 1:
        raise ValueError('use the keys "input" and "target" (or "input_text" and "target_text"), not both pairs'
                         if found else f'no "input"/"target" keys (found {sorted(obj)[:6]})')
    input_key, target_key = found[0]
    values = []
    for key in (input_key, target_key):
        if key not in obj:
            raise ValueError(f'"{key}" is missing')
        if not isinstance(obj[key], str):
            raise ValueError(f'"{key}" must be a string, got {type(obj[key]).__name__}')
        values.append(obj[key])
    if not values[1].strip():
        raise ValueError(f'"{target_key}" is empty: every example needs an output to learn')
    return Example(input=values[0], target=values[1])


def load_jsonl(path: str | Path) -> list[Example]:
    """Reads and parses a JSONL file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TrainingDataError(f"cannot read {path}: {e.strerror}") from None
    return parse_jsonl(data, source=str(path))


def data_hash(examples: list[Example]) -> str:
    """sha256 of the examples' content (independent of file formatting), recorded with a trained version."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.input, ex.target], ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Holds out `fraction` of the examples (at least one, if there are two or more), shuffled by `seed`."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(examples) * fraction))
    held = min(held, len(examples) - 1)
    held_idx = set(order[:held])
    return ([ex for i, ex in enumerate(examples) if i not in held_idx],
            [ex for i, ex in enumerate(examples) if i in held_idx])


def labels_of(examples: list[Example]) -> tuple[str, ...] | None:
    """The candidate labels when the data looks like classification (few distinct targets), else None."""
    counts = Counter(ex.target for ex in examples)
    if 2 <= len(counts) <= MAX_LABELS and len(counts) * 2 <= len(examples):
        return tuple(sorted(counts))
    return None


def check_eval_labels(labels: tuple[str, ...] | None, held_out: list[Example], *, source: str) -> None:
    """Refuses held-out data whose targets the classification training data never shows."""
    if labels is None:
        return
    unknown = sorted({ex.target for ex in held_out} - set(labels))
    if unknown:
        raise TrainingDataError(
            f"{source} has targets the training data never uses ({', '.join(map(repr, unknown[:5]))}); the "
            f"training labels are {', '.join(map(repr, labels))}: fix the labels or add training examples for them"
        )
