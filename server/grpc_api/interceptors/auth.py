"""Who may call what: bearer tokens, roles and task patterns, enforced by one gRPC server interceptor.

A call presents `authorization: Bearer <token>` metadata. The interceptor looks the token up in the
token file (`tokens.py`), checks the method against the role table below, and wraps the servicer's
behaviour so that the request's task names are checked against the token's patterns before the
servicer runs, and list answers are cut down to the tasks the token may see. The servicer runs as the
token's principal (`access.callers.CURRENT_CALLER`: fair share and priority bounds read it). Servicers stay
unaware of authentication. Health and reflection stay open: load balancers and grpcurl need no token.

| RPC                                                                | infer | admin |
|--------------------------------------------------------------------|-------|-------|
| Inference: Generate, GenerateStream, Classify, Tokenize, ModelInfo | yes   | yes   |
| Registry: GetPrompt, ListPrompts, ExportPrompt                     | yes   | yes   |
| Registry: RegisterPrompt, DeletePrompt, SetAlias                   | no    | yes   |
| Training: every RPC                                                | no    | yes   |
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from softprompt.prompts.refs import task_name
from softprompt.protos import softprompt_pb2 as pb
from softprompt.server.access.callers import CURRENT_CALLER, Principal
from softprompt.server.access.tokens import BARE_MODEL_TASK, Role, TokenEntry, TokenTable
from softprompt.server.grpc_api.interceptors import handlers

log = logging.getLogger(__name__)

OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})

# The services every token is checked for: each of their RPCs needs a rule (checked at import).
GUARDED_SERVICES = ("Inference", "Registry", "Training")

_HOW_TO_SEND = (
    "send the token as one metadata entry `authorization: Bearer <token>` (softprompt CLI: --token-file FILE, --token "
    "or $SOFTPROMPT_TOKEN; Python: Client(..., token=...))"
)

JobTask = Callable[[str], str | None]


@dataclass(frozen=True)
class Rule:
    """What one RPC requires.

    `tasks` names the tasks a request touches (each must match the token's patterns); `visible`
    drops the entries of a list answer whose task the token may not see.
    """

    role: Role
    tasks: Callable[[Any], list[str]] | None = None
    visible: Callable[[Any, TokenEntry], Any] | None = None


def task_of(ref: str) -> str:
    """The task name of a prompt reference ("name", "name@3", "name@prod"); BARE_MODEL_TASK for "".

    Never raises: an invalid reference is checked against the token as the text before its '@', and
    the servicer then refuses it as INVALID_ARGUMENT.
    """
    return task_name(ref) if ref else BARE_MODEL_TASK


def method(service: str, name: str) -> str:
    """The full gRPC method name of RPC `name` of softprompt service `service`.

    `method("Inference", "Generate")` is "/softprompt.v1.Inference/Generate"; `KeyError` for a service
    or RPC the schema lacks, so a misspelt rule fails at import (this module builds its rules then).
    """
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    return f"/{descriptor.full_name}/{descriptor.methods_by_name[name].name}"


def guarded_methods() -> frozenset[str]:
    """The full method names of every RPC of `GUARDED_SERVICES`, as the schema declares them."""
    return frozenset(method(service, rpc.name) for service in GUARDED_SERVICES
                     for rpc in pb.DESCRIPTOR.services_by_name[service].methods)


def rules(job_task: JobTask) -> dict[str, Rule]:
    """The access rules of every softprompt RPC, by full method name.

    `job_task` gives a training job's task from its id (None: no such job, which the servicer then
    reports as NOT_FOUND).
    """
    def by_ref(request: Any) -> list[str]:
        return [task_of(request.ref)]

    def by_task(request: Any) -> list[str]:
        return [task_of(request.task)]

    def by_name(request: Any) -> list[str]:
        return [task_of(request.name)]

    def listed(request: Any) -> list[str]:
        return [task_of(request.name)] if request.name else []

    def trained(request: Any) -> list[str]:
        init = request.options.init
        # A warm start reads another task's prompt, so that task must be allowed too.
        source = [task_of(init.removeprefix("from:"))] if init.startswith("from:") else []
        return [task_of(request.task), *source]

    def by_job(request: Any) -> list[str]:
        task = job_task(request.job_id)
        return [] if task is None else [task]

    infer, admin = Role.INFER, Role.ADMIN
    return {
        method("Inference", "Generate"): Rule(infer, by_task),
        method("Inference", "GenerateStream"): Rule(infer, by_task),
        method("Inference", "Classify"): Rule(infer, by_task),
        method("Inference", "Tokenize"): Rule(infer),
        method("Inference", "ModelInfo"): Rule(infer, None, _keep("tasks", "task")),
        method("Registry", "GetPrompt"): Rule(infer, by_ref),
        method("Registry", "ListPrompts"): Rule(infer, listed, _keep("prompts", "name")),
        method("Registry", "RegisterPrompt"): Rule(admin, by_name),
        method("Registry", "DeletePrompt"): Rule(admin, by_ref),
        method("Registry", "SetAlias"): Rule(admin, by_name),
        # A read like GetPrompt: a token that may run a task's prompts may take its files (weights, report, plot).
        method("Registry", "ExportPrompt"): Rule(infer, by_ref),
        method("Training", "TrainPrompt"): Rule(admin, trained),
        method("Training", "GetTrainingJob"): Rule(admin, by_job),
        method("Training", "WatchTrainingJob"): Rule(admin, by_job),
        method("Training", "CancelTrainingJob"): Rule(admin, by_job),
        method("Training", "ListTrainingJobs"): Rule(admin, None, _keep("jobs", "task")),
    }


def _keep(field: str, task_attr: str) -> Callable[[Any, TokenEntry], Any]:
    """A list-answer filter: keeps the entries of repeated `field` whose `task_attr` the token may use."""
    def visible(response: Any, entry: TokenEntry) -> Any:
        items = getattr(response, field)
        kept = [item for item in items if entry.allows_task(getattr(item, task_attr))]
        del items[:]
        items.extend(kept)
        return response
    return visible


# An RPC added to the schema without a rule would be refused to every token: fail at import instead.
_unruled = guarded_methods() - rules(lambda job_id: None).keys()
if _unruled:  # pragma: no cover - a schema edit that forgot its access rule
    raise ImportError(f"RPCs without an access rule in {__name__}.rules(): {sorted(_unruled)}")


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call but health and reflection, and enforces roles and task patterns."""

    def __init__(self, tokens: TokenTable, method_rules: Mapping[str, Rule]) -> None:
        self.tokens = tokens
        self.rules = dict(method_rules)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Returns the method's handler, wrapped to check its tasks, or one that refuses the call."""
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.lstrip("/").partition("/")[0] in OPEN_SERVICES:
            return handler
        try:
            entry = self._authenticate(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
            rule = self._authorize(method, entry)
        except _Refusal as refusal:
            return _refusing(handler, method, refusal)
        return _checked(handler, method, entry, rule)

    def _authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> TokenEntry:
        values = [value for key, value in metadata or () if key == "authorization"]
        if not values:
            raise _Refusal(grpc.StatusCode.UNAUTHENTICATED, f"this server requires a token: {_HOW_TO_SEND}")
        value = values[0] if isinstance(values[0], str) else ""
        scheme, _, token = value.partition(" ")
        token = token.strip()
        if len(values) > 1 or scheme.lower() != "bearer" or not token:
            raise _Refusal(grpc.StatusCode.UNAUTHENTICATED, f"malformed authorization metadata: {_HOW_TO_SEND}")
        entry = self.tokens.lookup(token)
        if entry is None:
            raise _Refusal(grpc.StatusCode.UNAUTHENTICATED,
                           "the token is not valid for this server: check it, or ask the server's operator for one")
        return entry

    def _authorize(self, method: str, entry: TokenEntry) -> Rule:
        rule = self.rules.get(method)
        if rule is None:  # a method nobody classified: closed rather than open
            raise _Refusal(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to any token")
        if not entry.role.includes(rule.role):
            raise _Refusal(grpc.StatusCode.PERMISSION_DENIED,
                           f"{_short(method)} needs a token with the {rule.role.value} role; "
                           f"this one has the {entry.role.value} role")
        return rule


def _short(method: str) -> str:
    return method.rsplit(".", 1)[-1]  # "/softprompt.v1.Registry/SetAlias" -> "Registry/SetAlias"


def _refusing(handler: grpc.RpcMethodHandler, method: str, refusal: _Refusal) -> grpc.RpcMethodHandler:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        # Never log the metadata: it holds the token.
        log.warning("refused %s from %s: %s", _short(method), context.peer(), refusal.code.name)
        context.abort(refusal.code, refusal.message)

    # The request is left unparsed: a refused caller's bytes are never decoded.
    return handlers.rebuild(handler, refuse, None)


def _checked(handler: grpc.RpcMethodHandler, method: str, entry: TokenEntry, rule: Rule) -> grpc.RpcMethodHandler:
    """The handler, run as the token's principal (`CURRENT_CALLER`: fair share and priorities read it), its
    request's tasks checked and its list answer cut down to the token's task patterns, if it has any."""
    principal = Principal.of(entry)
    limited = bool(entry.task_patterns)

    def check(request: Any, context: grpc.ServicerContext) -> None:
        if not limited:
            return  # the role check was all there was to do
        for task in rule.tasks(request) if rule.tasks else ():
            if not entry.allows_task(task):
                log.warning("refused %s from %s: task %r is outside the token's patterns (token file line %d)",
                            _short(method), context.peer(), task, entry.line)
                context.abort(grpc.StatusCode.PERMISSION_DENIED, _task_refusal(task, entry))

    if handler.unary_unary is not None:
        inner_unary = handler.unary_unary

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            check(request, context)
            token = CURRENT_CALLER.set(principal)
            try:
                response = inner_unary(request, context)
            finally:
                CURRENT_CALLER.reset(token)
            return rule.visible(response, entry) if rule.visible and limited else response

        return handlers.rebuild(handler, unary_unary, handler.request_deserializer)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            check(request, context)
            responses: Iterator[Any] | None = None
            while True:
                # Set around each step, not across yields: between two responses this thread is gRPC's.
                token = CURRENT_CALLER.set(principal)
                try:
                    if responses is None:
                        responses = iter(inner_stream(request, context))
                    response = next(responses)
                except StopIteration:
                    return
                finally:
                    CURRENT_CALLER.reset(token)
                yield response

        return handlers.rebuild(handler, unary_stream, handler.request_deserializer)
    if not limited:
        return handler
    # A request stream cannot be checked per task before it is read; no softprompt RPC has one.
    return _refusing(handler, method, _Refusal(grpc.StatusCode.PERMISSION_DENIED,
                                               f"{_short(method)} is not open to task-limited tokens"))


def _task_refusal(task: str, entry: TokenEntry) -> str:
    what = "the bare base model (task '-')" if task == BARE_MODEL_TASK else f"task {task!r}"
    return f"this token may not use {what}: it is limited to tasks matching {' '.join(entry.task_patterns)}"
