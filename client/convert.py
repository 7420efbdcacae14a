"""Conversions from protobuf responses to the client's dataclasses, derived from the dataclasses' fields.

Protobuf stays at the edge: only this module, `softprompt.client.requests` and `softprompt.client.calls`
touch generated message classes, so the public API speaks plain Python types. Each result type has a
counterpart on the wire for every field (checked at import by `softprompt.protos.mapping`); a field the
server left unset reads as None where the type admits it (e.g. `StreamChunk.usage` before the last chunk).
Finish reasons and training states map through `softprompt.protos.enums`, the table the server uses too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from softprompt.client.types import (
    CacheTier,
    ClassifyResult,
    EvalMetrics,
    ExportedPrompt,
    GenerateResult,
    KvCache,
    LabelScore,
    Limits,
    ModelInfo,
    PromptInfo,
    StreamChunk,
    TaskLoad,
    TokenizeResult,
    TrainingJob,
    TrainingProgress,
    Usage,
)
from softprompt.prompts.outcomes import FinishReason, TrainingState
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos.enums import finish_reason_from_pb, training_state_from_pb
from softprompt.protos.mapping import MessageMapping


def _finish_reason(value: int) -> FinishReason | Literal[""]:
    return finish_reason_from_pb(value) or ""  # "": the server did not say


def _training_state(value: int) -> TrainingState | Literal[""]:
    return training_state_from_pb(value) or ""  # "": the server did not say


_USAGE = MessageMapping(Usage, pb.Usage)
_LABEL_SCORE = MessageMapping(LabelScore, pb.LabelScore)
_EVAL_METRICS = MessageMapping(EvalMetrics, pb.EvalMetrics)

# One converter a response type: `convert.generate_result(message)` and so on.
generate_result = MessageMapping(GenerateResult, pb.GenerateResponse, decode={
    "usage": _USAGE.from_pb, "finish_reason": _finish_reason,
}).from_pb
# usage and finish_reason are None until the server sets them (the last chunk).
stream_chunk = MessageMapping(StreamChunk, pb.GenerateStreamResponse, decode={
    "usage": _USAGE.from_pb, "finish_reason": finish_reason_from_pb,
}).from_pb
tokenize_result = MessageMapping(TokenizeResult, pb.TokenizeResponse).from_pb
classify_result = MessageMapping(ClassifyResult, pb.ClassifyResponse, decode={"scores": _LABEL_SCORE.from_pb}).from_pb
# kv_cache is None from servers that do not report it.
model_info = MessageMapping(ModelInfo, pb.ModelInfoResponse, decode={
    "limits": MessageMapping(Limits, pb.Limits).from_pb, "kv_cache": MessageMapping(KvCache, pb.KvCache).from_pb,
    "tasks": MessageMapping(TaskLoad, pb.TaskLoad).from_pb,
    "caches": MessageMapping(CacheTier, pb.CacheTier).from_pb,
}).from_pb
prompt_info = MessageMapping(PromptInfo, pb.PromptInfo).from_pb
# before, after and version are None while the server leaves them unset.
training_job = MessageMapping(TrainingJob, pb.TrainingJob, decode={
    "state": _training_state,
    "progress": MessageMapping(TrainingProgress, pb.TrainingProgress).from_pb,
    "before": _EVAL_METRICS.from_pb,
    "after": _EVAL_METRICS.from_pb,
    "version": prompt_info,
}).from_pb


def prompt_page(msg: pb.ListPromptsResponse) -> tuple[list[PromptInfo], str]:
    """One page of a listing: its versions and the next page's token ("" after the last page)."""
    return [prompt_info(p) for p in msg.prompts], msg.next_page_token


def exported_prompt(msg: pb.ExportPromptResponse, directory: Path) -> ExportedPrompt:
    """Writes an ExportPromptResponse's files into `directory` (created if missing; files of the same names are
    replaced) and describes what it wrote. A name that is not a plain file name is refused before anything is
    written: the server names the files, and no name may reach outside the folder."""
    for f in msg.files:
        if not f.name or f.name.startswith(".") or Path(f.name).name != f.name or "\\" in f.name:
            raise ValueError(f"the server sent a file named {f.name!r}, which is not a plain file name: nothing was "
                             f"written to {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    for f in msg.files:
        (directory / f.name).write_bytes(f.data)
    return ExportedPrompt(prompt_info(msg.prompt), directory, tuple(f.name for f in msg.files))


def deleted_refs(msg: pb.DeletePromptResponse) -> list[str]:
    """Returns the refs a DeletePromptResponse reports as deleted."""
    return list(msg.deleted)


def training_jobs(msg: pb.ListTrainingJobsResponse) -> list[TrainingJob]:
    """Converts a ListTrainingJobsResponse to its jobs, newest first."""
    return [training_job(job) for job in msg.jobs]
