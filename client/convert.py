"""Conversions from protobuf responses to the client's dataclasses.

Protobuf stays at the edge: only this module and `softprompt.client.requests` touch generated
message classes, so the public API speaks plain Python types. Finish reasons and training states
map through `softprompt.protos.enums`, the table the server uses too.
"""

from __future__ import annotations

from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos.enums import finish_reason_from_pb, training_state_from_pb
from softprompt.client.types import (
    ClassifyResult,
    EvalMetrics,
    GenerateResult,
    KvCache,
    LabelScore,
    Limits,
    ModelInfo,
    PromptInfo,
    StreamChunk,
    TokenizeResult,
    TrainingJob,
    TrainingProgress,
    Usage,
)

def usage(msg: pb.Usage) -> Usage:
    """Converts a Usage message."""
    return Usage(
        input_tokens=msg.input_tokens,
        virtual_tokens=msg.virtual_tokens,
        generated_tokens=msg.generated_tokens,
    )


def generate_result(msg: pb.GenerateResponse) -> GenerateResult:
    """Converts a GenerateResponse."""
    return GenerateResult(
        text=msg.text,
        token_ids=list(msg.token_ids),
        finish_reason=finish_reason_from_pb(msg.finish_reason) or "",  # "": the server did not say
        usage=usage(msg.usage),
        prompt_version=msg.prompt_version,
    )


def stream_chunk(msg: pb.GenerateStreamResponse) -> StreamChunk:
    """Converts one GenerateStreamResponse; usage is None unless the server set it (last chunk)."""
    return StreamChunk(
        text=msg.text,
        token_ids=list(msg.token_ids),
        finish_reason=finish_reason_from_pb(msg.finish_reason),
        usage=usage(msg.usage) if msg.HasField("usage") else None,
        prompt_version=msg.prompt_version,
    )


def tokenize_result(msg: pb.TokenizeResponse) -> TokenizeResult:
    """Converts a TokenizeResponse."""
    return TokenizeResult(token_ids=list(msg.token_ids), tokens=list(msg.tokens))


def label_score(msg: pb.LabelScore) -> LabelScore:
    """Converts a LabelScore message."""
    return LabelScore(
        label=msg.label,
        logprob=msg.logprob,
        probability=msg.probability,
        num_tokens=msg.num_tokens,
    )


def classify_result(msg: pb.ClassifyResponse) -> ClassifyResult:
    """Converts a ClassifyResponse."""
    return ClassifyResult(
        scores=[label_score(s) for s in msg.scores],
        label=msg.label,
        prompt_version=msg.prompt_version,
        input_tokens=msg.input_tokens,
        virtual_tokens=msg.virtual_tokens,
    )


def limits(msg: pb.Limits) -> Limits:
    """Converts a Limits message."""
    return Limits(
        max_new_tokens=msg.max_new_tokens,
        default_max_new_tokens=msg.default_max_new_tokens,
        max_input_tokens=msg.max_input_tokens,
        max_virtual_tokens=msg.max_virtual_tokens,
        max_batch_size=msg.max_batch_size,
        max_queued_requests=msg.max_queued_requests,
        max_upload_bytes=msg.max_upload_bytes,
    )


def model_info(msg: pb.ModelInfoResponse) -> ModelInfo:
    """Converts a ModelInfoResponse."""
    return ModelInfo(
        model_id=msg.model_id,
        hidden_size=msg.hidden_size,
        dtype=msg.dtype,
        device=msg.device,
        max_sequence_length=msg.max_sequence_length,
        vocab_size=msg.vocab_size,
        fingerprint=msg.fingerprint,
        limits=limits(msg.limits),
        has_chat_template=msg.has_chat_template,
        kv_cache=kv_cache(msg.kv_cache) if msg.HasField("kv_cache") else None,
    )


def kv_cache(msg: pb.KvCache) -> KvCache:
    """Converts a KvCache message."""
    return KvCache(
        block_size=msg.block_size,
        total_blocks=msg.total_blocks,
        used_blocks=msg.used_blocks,
        rows=msg.rows,
        bytes_per_token=msg.bytes_per_token,
        total_tokens=msg.total_tokens,
        free_tokens=msg.free_tokens,
    )


def prompt_info(msg: pb.PromptInfo) -> PromptInfo:
    """Converts a PromptInfo message."""
    return PromptInfo(
        name=msg.name,
        version=msg.version,
        ref=msg.ref,
        num_virtual_tokens=msg.num_virtual_tokens,
        hidden_size=msg.hidden_size,
        sha256=msg.sha256,
        base_model_fingerprint=msg.base_model_fingerprint,
        created_at=msg.created_at,
        description=msg.description,
        tags=dict(msg.tags),
        aliases=tuple(msg.aliases),
        peft_type=msg.peft_type,
        metrics=dict(msg.metrics),
    )


def deleted_refs(msg: pb.DeletePromptResponse) -> list[str]:
    """Returns the refs a DeletePromptResponse reports as deleted."""
    return list(msg.deleted)


def eval_metrics(msg: pb.EvalMetrics) -> EvalMetrics:
    """Converts an EvalMetrics message; accuracy is None unless the server set it."""
    return EvalMetrics(
        examples=msg.examples,
        loss=msg.loss,
        exact_match=msg.exact_match,
        accuracy=msg.accuracy if msg.HasField("accuracy") else None,
    )


def training_progress(msg: pb.TrainingProgress) -> TrainingProgress:
    """Converts a TrainingProgress message; eval_loss is None before the first evaluation."""
    return TrainingProgress(
        step=msg.step,
        total_steps=msg.total_steps,
        epoch=msg.epoch,
        train_loss=msg.train_loss,
        eval_loss=msg.eval_loss if msg.HasField("eval_loss") else None,
        best_eval_loss=msg.best_eval_loss,
        steps_per_second=msg.steps_per_second,
        elapsed_seconds=msg.elapsed_seconds,
    )


def training_job(msg: pb.TrainingJob) -> TrainingJob:
    """Converts a TrainingJob; before, after and version are None while the server leaves them unset."""
    return TrainingJob(
        job_id=msg.job_id,
        task=msg.task,
        state=training_state_from_pb(msg.state) or "",  # "": the server did not say
        phase=msg.phase,
        progress=training_progress(msg.progress),
        before=eval_metrics(msg.before) if msg.HasField("before") else None,
        after=eval_metrics(msg.after) if msg.HasField("after") else None,
        version=prompt_info(msg.version) if msg.HasField("version") else None,
        promoted=msg.promoted,
        promotion=msg.promotion,
        error=msg.error,
        created_at=msg.created_at,
        finished_at=msg.finished_at,
        train_examples=msg.train_examples,
        eval_examples=msg.eval_examples,
    )


def training_jobs(msg: pb.ListTrainingJobsResponse) -> list[TrainingJob]:
    """Converts a ListTrainingJobsResponse to its jobs, newest first."""
    return [training_job(job) for job in msg.jobs]
