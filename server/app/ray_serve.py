"""softprompt as a Ray Serve application: each replica is one in-process softprompt App (one GPU).

Ray owns what a cluster needs: its gRPC proxy is the client-facing port (unary and server-streaming
calls), its controller places one replica per GPU, restarts dead ones and autoscales, and its router
picks a replica. This module only adapts the two worlds:

- `SoftpromptDeployment` builds one App with `build_app` from `softprompt serve` flags (the deployment's
  init args) and answers every Inference and Registry RPC by name, as Ray's proxy calls it. Each call
  runs the existing servicer method (`grpc_api.servicers`: conversion, status codes, logs) behind the
  same `AuthInterceptor` the gRPC server installs, on a thread, with `_Context` standing in for gRPC's
  servicer context. Training is not served here: a job lives in the replica that runs it, and Ray's
  router cannot send GetTrainingJob back to that replica (train with `softprompt train --store`).
- Routing by task: a client sends `multiplexed_model_id: <task>` metadata; the replica reports the
  tasks it served through `@serve.multiplexed` (the only way a replica tells Ray's router what it
  holds), so later requests of a task go to the replica whose prompt and prefix caches already hold it.
  The "load" does no work of its own: the request that triggers it admits the prompt into the caches
  anyway, and a separate warm-up would only load the same version twice (or fail a request for an
  unknown task with a loader error instead of the servicer's NOT_FOUND).
- Auth: the replica loads `--auth-tokens` (the path must exist on every node) and checks the
  `authorization: Bearer` metadata with the unchanged interceptor; Ray's proxy forwards metadata.
- Where the proxies listen (`ProxyListeners`, read from Serve's controller by `build`): Ray binds its gRPC proxy
  on every interface whatever the config says, so the replica holds gRPC to `http_options.host`'s scope: with
  a loopback host it answers callers on this machine only (PERMISSION_DENIED, saying why, to the others). At
  start it warns when a listener other machines can reach has no token file protecting it.
- HTTP: the OpenAI-compatible API (`http_api`, same tokens) is the deployment's ASGI ingress, built in
  the replica over its App and served by Ray's HTTP proxy.

`build` is the application builder `serve run` imports (see deploy/ray/serve_config.yaml).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from softprompt.protos import softprompt_pb2 as pb
from softprompt.server import config as server_config
from softprompt.server.access.tokens import TokenTable
from softprompt.server.app.server import build_app
from softprompt.server.config import ServerConfig
from softprompt.server.grpc_api.exposure import is_loopback
from softprompt.server.grpc_api.interceptors import auth
from softprompt.server.grpc_api.servicers import InferenceServicer, RegistryServicer
from softprompt.server.http_api.app import create_http_app

log = logging.getLogger(__name__)

# What Ray's gRPC proxy serves (its `grpc_options.grpc_servicer_functions`); the deployment answers each RPC.
SERVED = ("Inference", "Registry")
GRPC_SERVICER_FUNCTIONS = [f"softprompt.protos.softprompt_pb2_grpc.add_{s}Servicer_to_server" for s in SERVED]
# Tasks a replica advertises to Ray's router; past this many the least recently used stops attracting its
# requests (the prompt and prefix caches have their own, byte-sized LRUs).
TASKS_PER_REPLICA = 64
# Flags whose job Ray's proxies do: TLS given to a replica would silently not apply, so it is refused.
_REFUSED = ("tls_cert", "tls_key", "tls_client_ca")


def config_from_flags(flags: Sequence[str]) -> ServerConfig:
    """The ServerConfig of `softprompt serve` flags (the same parser, defaults and checks).

    The replica binds no port: --host, --port, --http-port and --metrics-port do not apply (Ray's proxies
    listen), and TLS flags are refused: TLS terminates in front of Ray's proxy.
    """
    parser = argparse.ArgumentParser(prog="softprompt (Ray Serve replica)", exit_on_error=False)
    server_config.add_arguments(parser)
    try:
        args, unknown = parser.parse_known_args(list(flags))
    except argparse.ArgumentError as exc:
        raise ValueError(f"bad softprompt flag in the Ray Serve config: {exc}") from None
    if unknown:
        raise ValueError(f"unknown softprompt flags in the Ray Serve config: {' '.join(unknown)}")
    config = server_config.from_args(args)
    given = [name for name in _REFUSED if getattr(config, name) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} does not apply on Ray Serve: terminate TLS in front of "
                         "Ray's proxy (a load balancer or ingress)")
    return config


@dataclass(frozen=True)
class ProxyListeners:
    """Where Ray Serve's proxies listen, as its config says (`http_options`, `grpc_options`)."""

    http_host: str
    http_port: int
    grpc_port: int | None  # None: no gRPC proxy (no port, or no servicer functions)

    @property
    def local_only(self) -> bool:
        """Whether the config keeps the proxies to this machine (a loopback `http_options.host`)."""
        return is_loopback(self.http_host)

    def allows(self, peer: str) -> bool:
        """Whether a gRPC caller at `peer` (gRPC's "ipv4:10.0.0.5:4312", "ipv6:[::1]:4312") may be answered."""
        if not self.local_only:
            return True
        kind, _, address = peer.partition(":")
        if kind == "unix":
            return True
        host = address.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else ""
        return bool(host) and is_loopback(host)

    def refusal(self, peer: str) -> str:
        """Why a caller at `peer` is refused, and what to change."""
        return (f"this Ray Serve deployment serves this machine only (http_options.host {self.http_host}), and the "
                f"call came from {peer}; to serve other machines set http_options.host to 0.0.0.0 (or this "
                "machine's address) with --auth-tokens in the softprompt flags")

    def exposure(self, tokens: bool) -> str | None:
        """The start-up warning for listeners other machines reach without a token file; None when there is none."""
        if tokens or self.local_only:
            return None
        reached = [f"the HTTP proxy on {self.http_host}:{self.http_port}"]
        if self.grpc_port is not None:
            reached.append(f"the gRPC proxy on port {self.grpc_port} of every interface")
        return (f"no --auth-tokens, and other machines reach {' and '.join(reached)}: anyone there can generate, "
                "register and delete prompts; add --auth-tokens to the softprompt flags, or set http_options.host "
                "to 127.0.0.1 to serve this machine only")


def proxy_listeners() -> ProxyListeners | None:
    """The running Serve instance's proxy config, read from its controller (`serve.start` or a config file's
    `http_options` and `grpc_options`); None where no Serve instance runs (an application built to inspect it)."""
    import ray
    from ray.serve.context import _get_global_client

    if not ray.is_initialized():
        return None
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    http = client.http_config
    grpc_options = ray.get(client._controller.get_grpc_config.remote())
    grpc_port = grpc_options.port if grpc_options.port and grpc_options.grpc_servicer_functions else None
    return ProxyListeners(http.host, http.port, grpc_port)


class _Aborted(Exception):
    """Raised by `_Context.abort`; Ray's proxy answers with the status code and details set on its context."""


class _Context:
    """What the servicers and the auth interceptor use of `grpc.ServicerContext`, over Ray's request context.

    Deadlines: Ray's proxy cancels the call when the client's deadline passes or it goes away, which runs
    the callbacks (cancelling the generation); the servicers therefore see no deadline of their own.
    """

    def __init__(self, ray_context: RayServegRPCContext) -> None:
        self.ray_context = ray_context
        self._callbacks: list[Callable[[], None]] = []
        self._ended = False

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        """Ends the RPC with `code`: set on Ray's context, which the proxy sends to the client."""
        self.ray_context.set_code(code)
        self.ray_context.set_details(details)
        raise _Aborted(details)

    def time_remaining(self) -> float | None:
        return None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self._ended:
            return False
        self._callbacks.append(callback)
        return True

    def is_active(self) -> bool:
        return not self._ended

    def peer(self) -> str:
        return self.ray_context.peer()

    def end(self) -> None:
        """The RPC is over (finished, failed or cancelled): runs the callbacks, as gRPC does."""
        self._ended = True
        for callback in self._callbacks:
            callback()


@dataclass(frozen=True)
class _CallDetails:
    """The `grpc.HandlerCallDetails` an interceptor reads."""

    method: str
    invocation_metadata: Sequence[tuple[str, str]]


_SERVICE_OF = {m.name: s for s in SERVED for m in pb.DESCRIPTOR.services_by_name[s].methods}
_STREAMING = {m.name for s in SERVED for m in pb.DESCRIPTOR.services_by_name[s].methods if m.server_streaming}
_END = object()


class SoftpromptDeployment:
    """One replica: one App on one device, answering Ray's gRPC proxy (see the module docstring)."""

    def __init__(self, flags: Sequence[str] = (), listeners: ProxyListeners | None = None) -> None:
        config = config_from_flags(flags)
        # Given by `build`; None (a deployment bound by hand): gRPC is answered whatever the caller's address.
        self._listeners = listeners
        self.served = build_app(config)
        services = self.served.services
        self._servicers = {"Inference": InferenceServicer(services.inference),
                           "Registry": RegistryServicer(services.prompts, config.max_upload_bytes)}
        self._tokens = None if config.auth_tokens is None else TokenTable.load(config.auth_tokens)
        # Training RPCs are not served here, so no rule ever asks for a job's task.
        self._auth = None if self._tokens is None else auth.AuthInterceptor(self._tokens,
                                                                           auth.rules(lambda job_id: None))
        warning = None if listeners is None else listeners.exposure(tokens=self._tokens is not None)
        if warning is not None:
            log.warning("%s", warning)
        elif self._auth is None:
            log.info("no --auth-tokens: this replica answers anyone who reaches Ray's proxies (%s)",
                     "unknown listeners" if listeners is None else f"this machine only: {listeners.http_host}")
        # One thread per RPC in flight, as the gRPC server holds them; Ray's max_ongoing_requests bounds it.
        self._threads = ThreadPoolExecutor(max_workers=config.rpc_workers, thread_name_prefix="softprompt-ray")
        self.served.start_work()  # as `softprompt serve` starts it
        spec = self.served.base.spec
        log.info("Ray Serve replica serving %s on %s; prompt store %s", spec.model_id, self.served.base.device,
                 config.store_url)

    def __serve_build_asgi_app__(self) -> Any:
        """The OpenAI-compatible HTTP API of this replica, which Ray's HTTP proxy serves (`serve.ingress`)."""
        return create_http_app(self.served.services, tokens=self._tokens,
                               max_body_bytes=self.served.config.max_upload_bytes, metrics=self.served.metrics)

    @serve.multiplexed(max_num_models_per_replica=TASKS_PER_REPLICA)
    async def _advertise(self, task: str) -> str:
        """Records `task` as held here, so Ray's router prefers this replica for it (module docstring)."""
        return task

    def _handler(self, rpc: str, context: _Context) -> grpc.RpcMethodHandler:
        """The servicer's method for `rpc`, behind the auth interceptor when tokens are on; a caller outside the
        listeners' scope (`ProxyListeners.allows`) is refused before either."""
        service = _SERVICE_OF[rpc]
        factory = grpc.unary_stream_rpc_method_handler if rpc in _STREAMING else grpc.unary_unary_rpc_method_handler
        peer = context.peer()
        if self._listeners is not None and not self._listeners.allows(peer):
            listeners = self._listeners

            def refuse(request: Any, ctx: _Context) -> Any:
                log.warning("refused %s/%s from %s: outside http_options.host %s", service, rpc, peer,
                            listeners.http_host)
                ctx.abort(grpc.StatusCode.PERMISSION_DENIED, listeners.refusal(peer))
            return factory(refuse)
        handler = factory(getattr(self._servicers[service], rpc))
        if self._auth is None:
            return handler
        details = _CallDetails(auth.method(service, rpc), context.ray_context.invocation_metadata())
        return self._auth.intercept_service(lambda _: handler, details)  # type: ignore[arg-type,return-value]

    async def _route(self) -> None:
        task = serve.get_multiplexed_model_id()
        if task:
            await self._advertise(task)

    async def _unary(self, rpc: str, request: Any, grpc_context: RayServegRPCContext) -> Any:
        await self._route()
        context = _Context(grpc_context)
        try:
            run = self._handler(rpc, context).unary_unary
            return await asyncio.get_running_loop().run_in_executor(self._threads, run, request, context)
        finally:
            context.end()

    async def _stream(self, rpc: str, request: Any, grpc_context: RayServegRPCContext) -> AsyncIterator[Any]:
        await self._route()
        context = _Context(grpc_context)
        loop = asyncio.get_running_loop()
        try:
            responses = self._handler(rpc, context).unary_stream(request, context)
            while (response := await loop.run_in_executor(self._threads, next, responses, _END)) is not _END:
                yield response
        finally:
            # Also on cancellation (the client left): cancels the generation, which ends the blocked `next`.
            context.end()

    def __del__(self) -> None:
        """Ray Serve's graceful shutdown: refuse new work, stop training, give in-flight requests time."""
        app = getattr(self, "served", None)
        if app is None:  # the constructor failed
            return
        app.scheduler.stop_admitting()
        app.stop_work(5.0)
        self._threads.shutdown(wait=False)


def _rpc(name: str) -> Callable[..., Any]:
    """The deployment method Ray's proxy calls for RPC `name` (it calls methods by the RPC's name)."""
    if name in _STREAMING:
        async def stream(self: SoftpromptDeployment, request: Any,
                         grpc_context: RayServegRPCContext) -> AsyncIterator[Any]:
            async for response in self._stream(name, request, grpc_context):
                yield response
        method: Callable[..., Any] = stream
    else:
        async def unary(self: SoftpromptDeployment, request: Any, grpc_context: RayServegRPCContext) -> Any:
            return await self._unary(name, request, grpc_context)
        method = unary
    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"The {_SERVICE_OF[name]}/{name} RPC."
    return method


for _name in _SERVICE_OF:
    setattr(SoftpromptDeployment, _name, _rpc(_name))

# Defaults for what the config file leaves out; the file's `deployments:` entry overrides any of these.
Deployment = serve.deployment(
    # The HTTP API through Ray's HTTP proxy, its app built in each replica (`__serve_build_asgi_app__`).
    serve.ingress()(SoftpromptDeployment),
    name="softprompt",
    # A request waits in the replica's own scheduler (continuous batching): let a full batch and a queue in.
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
)


def build(args: dict[str, Any]) -> serve.Application:
    """The application builder of `serve run` (`import_path: softprompt.server.app.ray_serve:build`).

    `args` holds `flags`: the `softprompt serve` flags each replica is built from (model, store, tokens, ...).
    """
    unknown = set(args) - {"flags"}
    if unknown:
        raise ValueError(f"unknown softprompt args in the Ray Serve config: {sorted(unknown)}; expected 'flags'")
    flags = list(args.get("flags", []))
    config = config_from_flags(flags)  # a bad flag fails here, at deploy time, rather than in every replica
    listeners = proxy_listeners()
    warning = None if listeners is None else listeners.exposure(tokens=config.auth_tokens is not None)
    if warning is not None:  # here too, where `serve run` shows it, not only in the replicas' logs
        log.warning("%s", warning)
    return Deployment.bind(flags, listeners)
