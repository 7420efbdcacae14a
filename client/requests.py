"""Builds the protobuf requests sent by `Client` and `AsyncClient`.

Both clients call these functions, so a request means the same thing whichever transport sends it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union

from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos.options import options_to_pb
from softprompt.client.sources import PeftFiles, PromptSource, RawMatrix, load_source
from softprompt.prompts.options import TrainingOptions

# A JSONL file's path, its bytes, or the examples themselves ({"input": ..., "target": ...} each).
TrainingData = Union[str, "os.PathLike[str]", bytes, Iterable[Mapping[str, Any]]]


def decoding_parameters(
    *,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop: Iterable[str] = (),
    chat: bool = False,
) -> pb.DecodingParameters:
    """Builds DecodingParameters; 0 values mean the server's defaults (greedy, no filtering)."""
    # A lone string is a common slip for a one-element list; iterating it would stop on each char.
    stops = [stop] if isinstance(stop, str) else list(stop)
    params = pb.DecodingParameters(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=stops,
        apply_chat_template=chat,
    )
    if seed is not None:  # proto3 optional: leaving it unset means "no fixed seed"
        params.seed = seed
    return params


def generate_request(
    task: str,
    input: str,
    *,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 0.0,
    seed: int | None = None,
    stop: Iterable[str] = (),
    chat: bool = False,
) -> pb.GenerateRequest:
    """Builds a GenerateRequest (used by both Generate and GenerateStream)."""
    params = decoding_parameters(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stop,
        chat=chat,
    )
    return pb.GenerateRequest(task=task, input=input, params=params)


def tokenize_request(text: str, chat: bool = False) -> pb.TokenizeRequest:
    """Builds a TokenizeRequest."""
    return pb.TokenizeRequest(text=text, apply_chat_template=chat)


def classify_request(
    task: str, input: str, labels: Iterable[str], *, chat: bool = False
) -> pb.ClassifyRequest:
    """Builds a ClassifyRequest; the server checks the labels (two or more, distinct, non-empty)."""
    # As with stop sequences, a lone string would otherwise be split into one label per character.
    candidates = [labels] if isinstance(labels, str) else list(labels)
    return pb.ClassifyRequest(task=task, input=input, labels=candidates, apply_chat_template=chat)


def model_info_request() -> pb.ModelInfoRequest:
    """Builds a ModelInfoRequest."""
    return pb.ModelInfoRequest()


def register_request(
    task: str,
    source: PromptSource,
    *,
    description: str = "",
    tags: Mapping[str, str] | None = None,
    base_model_fingerprint: str = "",
    force: bool = False,
) -> pb.RegisterPromptRequest:
    """Reads `source` (see `sources.load_source`) and builds a RegisterPromptRequest.

    A fingerprint recorded in a PEFT directory's softprompt.json is sent unless the caller gave one.
    """
    loaded = load_source(source)
    request = pb.RegisterPromptRequest(
        name=task,
        description=description,
        tags=dict(tags or {}),
        base_model_fingerprint=base_model_fingerprint,
        force=force,
    )
    if isinstance(loaded, PeftFiles):
        request.peft.CopyFrom(_peft_adapter(loaded))
        request.base_model_fingerprint = base_model_fingerprint or loaded.base_model_fingerprint
    else:
        request.tensor.CopyFrom(_raw_tensor(loaded))
    return request


def _peft_adapter(files: PeftFiles) -> pb.PeftAdapter:
    return pb.PeftAdapter(
        adapter_config_json=files.adapter_config_json,
        adapter_model_safetensors=files.adapter_model_safetensors,
    )


def _raw_tensor(matrix: RawMatrix) -> pb.RawTensor:
    return pb.RawTensor(shape=list(matrix.shape), dtype=matrix.dtype, data=matrix.data)


def get_prompt_request(ref: str) -> pb.GetPromptRequest:
    """Builds a GetPromptRequest."""
    return pb.GetPromptRequest(ref=ref)


def list_prompts_request(
    task: str | None = None, page_size: int = 0, page_token: str = ""
) -> pb.ListPromptsRequest:
    """Builds one page's ListPromptsRequest; task None lists every task."""
    return pb.ListPromptsRequest(name=task or "", page_size=page_size, page_token=page_token)


def delete_prompt_request(
    ref: str, *, all_versions: bool = False, force: bool = False
) -> pb.DeletePromptRequest:
    """Builds a DeletePromptRequest."""
    return pb.DeletePromptRequest(ref=ref, all_versions=all_versions, force=force)


def set_alias_request(task: str, alias: str, version: int) -> pb.SetAliasRequest:
    """Builds a SetAliasRequest."""
    return pb.SetAliasRequest(name=task, alias=alias, version=version)


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


def training_options(options: TrainingOptions) -> pb.TrainingOptions:
    """Converts TrainingOptions, setting every field (seed and eval_fraction included, even at 0)."""
    return options_to_pb(options)


def train_request(
    task: str,
    train_data: TrainingData,
    eval_data: TrainingData | None = None,
    *,
    options: TrainingOptions | None = None,
    description: str = "",
    tags: Mapping[str, str] | None = None,
    promote_alias: str = "",
) -> pb.TrainPromptRequest:
    """Reads the data (see `training_jsonl`) and builds a TrainPromptRequest.

    No eval data leaves the server to hold out `options.eval_fraction` of the training data;
    options None sends the TrainingOptions defaults.
    """
    return pb.TrainPromptRequest(
        task=task,
        train_jsonl=training_jsonl(train_data),
        eval_jsonl=b"" if eval_data is None else training_jsonl(eval_data),
        options=training_options(options or TrainingOptions()),
        description=description,
        tags=dict(tags or {}),
        promote_alias=promote_alias,
    )


def training_job_request(job_id: str) -> pb.TrainingJobRequest:
    """Builds a TrainingJobRequest (Get, Watch and Cancel)."""
    return pb.TrainingJobRequest(job_id=job_id)


def list_training_jobs_request() -> pb.ListTrainingJobsRequest:
    """Builds a ListTrainingJobsRequest."""
    return pb.ListTrainingJobsRequest()
