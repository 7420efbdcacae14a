"""Protobuf messages <-> the service layer's dataclasses, for the gRPC servicers.

Only conversions live here: no checks beyond what a message's shape forces, no service calls. The
dataclasses are the service layer's face (`service.types`, which re-exports the registry's and the jobs' own
records) and the core's (`core.types`), all torch-free. Enums, decoding and training options convert through
`softprompt.protos` (derived from the dataclasses' fields), shared with the client.
"""

from __future__ import annotations

import dataclasses

from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos.enums import finish_reason_to_pb, training_state_to_pb
from softprompt.protos.options import decoding_from_pb, options_from_pb
from softprompt.server.access.callers import Principal
from softprompt.server.core.errors import InvalidRequestError
from softprompt.server.core.types import (
    ClassifyRequest,
    ClassifyResult,
    GenerationRequest,
    GenerationResult,
    KvUsage,
    StreamChunk,
    Tokenization,
    Usage,
)
from softprompt.server.service.types import (
    EvalResult,
    JobSnapshot,
    ModelInfo,
    PeftUpload,
    Progress,
    PromptUpload,
    PromptVersion,
    TensorUpload,
    TrainJobRequest,
)

# ---------------------------------------------------------------- inference


def generation_request(msg: pb.GenerateRequest, deadline: float | None,
                       principal: Principal = Principal()) -> GenerationRequest:
    """A Generate / GenerateStream request from `principal`; `deadline` is the RPC's, on time.monotonic()."""
    return GenerationRequest(task=msg.task, input=msg.input, options=decoding_from_pb(msg.params), deadline=deadline,
                             priority=msg.priority if msg.HasField("priority") else None, principal=principal)


def usage(u: Usage) -> pb.Usage:
    """A request's token counts."""
    return pb.Usage(input_tokens=u.input_tokens, virtual_tokens=u.virtual_tokens, generated_tokens=u.generated_tokens)


def generate_response(result: GenerationResult) -> pb.GenerateResponse:
    """A finished generation."""
    return pb.GenerateResponse(
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=finish_reason_to_pb(result.finish_reason),
        usage=usage(result.usage),
        prompt_version=result.prompt_version,
    )


def stream_message(chunk: StreamChunk) -> pb.GenerateStreamResponse:
    """One streamed chunk; the last carries the finish reason and usage."""
    msg = pb.GenerateStreamResponse(text=chunk.text, token_ids=chunk.token_ids, prompt_version=chunk.prompt_version)
    if chunk.finish_reason is not None:
        msg.finish_reason = finish_reason_to_pb(chunk.finish_reason)
    if chunk.usage is not None:
        msg.usage.CopyFrom(usage(chunk.usage))
    return msg


def classify_request(msg: pb.ClassifyRequest, deadline: float | None,
                     principal: Principal = Principal()) -> ClassifyRequest:
    """A Classify request from `principal`; `deadline` is the RPC's, on time.monotonic()."""
    return ClassifyRequest(task=msg.task, input=msg.input, labels=tuple(msg.labels), chat=msg.apply_chat_template,
                           deadline=deadline, principal=principal)


def classify_response(result: ClassifyResult) -> pb.ClassifyResponse:
    """Every label's score and the most likely label."""
    return pb.ClassifyResponse(
        scores=[pb.LabelScore(label=x.label, logprob=x.logprob, probability=x.probability,
                              num_tokens=x.num_tokens) for x in result.scores],
        label=result.label,
        prompt_version=result.prompt_version,
        input_tokens=result.input_tokens,
        virtual_tokens=result.virtual_tokens,
    )


def tokenize_response(t: Tokenization) -> pb.TokenizeResponse:
    """Token ids and their string pieces."""
    return pb.TokenizeResponse(token_ids=t.token_ids, tokens=t.tokens)


def model_info_response(info: ModelInfo) -> pb.ModelInfoResponse:
    """The model's description; the message's fields (and its Limits') are the dataclasses' by name, its
    KvCache is `kv_cache`'s."""
    fields = {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
    return pb.ModelInfoResponse(**{**fields, "limits": pb.Limits(**dataclasses.asdict(info.limits)),
                                   "kv_cache": kv_cache(info.kv_cache),
                                   "tasks": [pb.TaskLoad(**dataclasses.asdict(t)) for t in info.tasks],
                                   "caches": [pb.CacheTier(name=name, **dataclasses.asdict(stats))
                                              for name, stats in info.caches.items()]})


def kv_cache(kv: KvUsage) -> pb.KvCache:
    """The KV pool's size and use; the token counts are derived here so clients need not know the block size."""
    return pb.KvCache(block_size=kv.block_size, total_blocks=kv.total_blocks, used_blocks=kv.used_blocks,
                      rows=kv.rows, bytes_per_token=kv.bytes_per_token, total_tokens=kv.total_tokens,
                      free_tokens=kv.free_tokens)


# ---------------------------------------------------------------- registry


def prompt_upload(msg: pb.RegisterPromptRequest) -> PromptUpload:
    """A RegisterPrompt request's upload; `InvalidRequestError` when it carries no source."""
    which = msg.WhichOneof("source")
    source: PeftUpload | TensorUpload
    if which == "peft":
        source = PeftUpload(msg.peft.adapter_config_json, msg.peft.adapter_model_safetensors,
                            msg.peft.task_id if msg.peft.HasField("task_id") else None)
    elif which == "tensor":
        source = TensorUpload(tuple(msg.tensor.shape), msg.tensor.dtype, msg.tensor.data)
    else:
        raise InvalidRequestError("RegisterPromptRequest needs a source: set `peft` (a PEFT adapter) or `tensor`")
    return PromptUpload(name=msg.name, source=source, description=msg.description, tags=dict(msg.tags),
                        base_model_fingerprint=msg.base_model_fingerprint, force=msg.force)


def prompt_info(v: PromptVersion) -> pb.PromptInfo:
    """The wire form of a stored version."""
    return pb.PromptInfo(
        name=v.name,
        version=v.version,
        ref=v.ref,
        num_virtual_tokens=v.num_virtual_tokens,
        hidden_size=v.hidden_size,
        sha256=v.sha256,
        base_model_fingerprint=v.base_model_fingerprint,
        created_at=v.created_at,
        description=v.description,
        tags=dict(v.tags),
        aliases=list(v.aliases),
        peft_type=v.source_type,
        metrics=dict(v.metrics),
        candidate=v.candidate,
        method=v.method,
        num_layers=v.num_layers,
        kv_heads=v.kv_heads,
        head_dim=v.head_dim,
        size_bytes=v.size_bytes,
        peft_task_id=v.peft_task_id,
    )


# ---------------------------------------------------------------- training


def train_job_request(msg: pb.TrainPromptRequest) -> TrainJobRequest:
    """A TrainPrompt request; unset options take the defaults, a bad one raises `InvalidRequestError`."""
    try:
        options = options_from_pb(msg.options)
    except ValueError as e:
        raise InvalidRequestError(f"training options: {e}") from None
    return TrainJobRequest(task=msg.task, train_jsonl=msg.train_jsonl, eval_jsonl=msg.eval_jsonl, options=options,
                           description=msg.description, tags=dict(msg.tags), promote_alias=msg.promote_alias)


def _eval_metrics(r: EvalResult | None) -> pb.EvalMetrics | None:
    if r is None:
        return None
    return pb.EvalMetrics(examples=r.examples, loss=r.loss, exact_match=r.exact_match, accuracy=r.accuracy)


def _progress(p: Progress | None) -> pb.TrainingProgress | None:
    if p is None:
        return None
    return pb.TrainingProgress(
        step=p.step, total_steps=p.total_steps, epoch=p.epoch, train_loss=p.train_loss or 0.0,
        eval_loss=p.eval_loss, best_eval_loss=p.best_eval_loss or 0.0, steps_per_second=p.steps_per_second,
        elapsed_seconds=p.elapsed_seconds,
    )


def training_job(j: JobSnapshot) -> pb.TrainingJob:
    """A training job as it stands."""
    return pb.TrainingJob(
        job_id=j.job_id,
        task=j.task,
        state=training_state_to_pb(j.state),
        phase=j.phase,
        progress=_progress(j.progress),
        before=_eval_metrics(j.before),
        after=_eval_metrics(j.after),
        version=None if j.version is None else prompt_info(j.version),
        promoted=j.promoted,
        promotion=j.promotion,
        error=j.error,
        created_at=j.created_at,
        finished_at=j.finished_at,
        train_examples=j.train_examples,
        eval_examples=j.eval_examples,
    )
