"""What goes into the requests of `softprompt.client.calls` beyond copying arguments: decoding options merged
with keyword arguments, candidate labels, a prompt source read into an upload, training data as JSONL.

Both clients send what `calls` builds with these, so a request means the same thing whichever client sends it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from softprompt.client.sources import PeftFiles, PromptSource, load_source
from softprompt.prompts.options import DecodingOptions
from softprompt.protos import softprompt_pb2 as pb

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from softprompt.prompts.options import DecodingKeywords

# A JSONL file's path, its bytes, or the examples themselves ({"input": ..., "target": ...} each).
TrainingData = Union[str, "os.PathLike[str]", bytes, Iterable[Mapping[str, Any]]]


def decoding_options(options: DecodingOptions | None = None, **decoding: Unpack[DecodingKeywords]) -> DecodingOptions:
    """`options` (None: every field's default) with the fields named in `decoding` replaced.

    Raises:
        TypeError: a keyword is not a `DecodingOptions` field.
    """
    if options is None:
        return DecodingOptions(**decoding)
    return dataclasses.replace(options, **decoding) if decoding else options


def labels(candidates: Iterable[str]) -> list[str]:
    """Classify's candidate labels; the server checks them (two or more, distinct, non-empty)."""
    # As with stop sequences, a lone string would otherwise be split into one label per character.
    return [candidates] if isinstance(candidates, str) else list(candidates)


def add_source(request: pb.RegisterPromptRequest, source: PromptSource, *, task_id: int | None = None) -> None:
    """Reads `source` (see `sources.load_source`) into `request`'s upload; `task_id` (a PEFT adapter only) picks
    a MULTITASK_PROMPT_TUNING adapter's task.

    A fingerprint recorded in a PEFT directory's softprompt.json is sent unless the request has one.
    """
    if task_id is not None and (isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0):
        raise ValueError(f"task_id must be a task number >= 0, got {task_id!r}")
    loaded = load_source(source)
    if isinstance(loaded, PeftFiles):
        request.peft.CopyFrom(pb.PeftAdapter(
            adapter_config_json=loaded.adapter_config_json,
            adapter_model_safetensors=loaded.adapter_model_safetensors,
            task_id=task_id,
        ))
        request.base_model_fingerprint = request.base_model_fingerprint or loaded.base_model_fingerprint
    else:
        if task_id is not None:
            raise ValueError("task_id picks a MULTITASK_PROMPT_TUNING adapter's task: give a PEFT adapter directory")
        request.tensor.CopyFrom(pb.RawTensor(shape=list(loaded.shape), dtype=loaded.dtype, data=loaded.data))


def training_jsonl(data: TrainingData) -> bytes:
    """Returns training data as JSONL bytes, one {"input": ..., "target": ...} object a line.

    `data` is a path to a JSONL file (a str is always a path, never JSONL text), the file's bytes
    (sent as they are), or an iterable of dicts (each serialized with `json.dumps`, non-ASCII kept).
    The server checks the examples themselves.

    Raises:
        OSError: the file cannot be read.
        TypeError: an example is not a dict, or a value is not JSON-serializable.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, (str, os.PathLike)):
        return Path(data).read_bytes()
    lines = []
    for i, example in enumerate(data):
        if not isinstance(example, Mapping):
            raise TypeError(
                f"training example {i} is a {type(example).__name__}; "
                "expected a dict like {'input': ..., 'target': ...}"
            )
        lines.append(json.dumps(dict(example), ensure_ascii=False) + "\n")
    return "".join(lines).encode("utf-8")
