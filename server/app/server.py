"""Wires the parts together: `build_app` loads the model, `create_server` binds gRPC, `serve` runs it."""

from __future__ import annotations

import errno
import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from softprompt.prompts.registry import Registry, open_store
from softprompt.prompts.registry.cached import CachedStore
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc
from softprompt.server.grpc_api.interceptors import auth
from softprompt.server.grpc_api import exposure as security
from softprompt.server.core import omp
from softprompt.server.core.admission import Admission
from softprompt.server.config import ServerConfig, default_cache_dir
from softprompt.server.core.engine import Engine
from softprompt.server.core.errors import TrainingJobNotFoundError
from softprompt.server.grpc_api.interceptors.observing import ObservingInterceptor
from softprompt.server.observability.factory import create_metrics
from softprompt.server.observability.metrics import Metrics, NoMetrics, snapshot_reader
from softprompt.server.app.kv_budget import resolve_kv_cache_bytes
from softprompt.server.app.loading import load_base_model
from softprompt.server.app.ports import PortInUseError, check_free, in_use_message
from softprompt.server.core.model import BaseModel
from softprompt.server.core.packed_linear import packing_available
from softprompt.server.core.fairness import FairShare
from softprompt.server.core.policy import PolicyFile
from softprompt.server.core.host_tier import HostTierLoader
from softprompt.server.core.prefix_warmer import PrefixWarmer
from softprompt.server.core.prompt_cache import HostTier, PromptCache, prompt_tiers
from softprompt.server.core.scheduler import Scheduler
from softprompt.server.core.support import check_servable
from softprompt.server.grpc_api.servicers import InferenceServicer, RegistryServicer, TrainingServicer
from softprompt.server.jobs.training import TrainingJobs
from softprompt.server.grpc_api.interceptors.decoding import DecodeErrorInterceptor
from softprompt.server.service import Services
from softprompt.server.service.inference import InferenceService
from softprompt.server.service.prompts import PromptService
from softprompt.server.service.training import TrainingService

if TYPE_CHECKING:
    from softprompt.server.http_api.server import HttpServer

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())
# gRPC itself refuses messages past twice the upload limit (at least its 4 MiB default); between the two
# RegisterPrompt answers with a message naming the flag to raise.
_HARD_MESSAGE_FACTOR = 2


@dataclass
class App:
    """The serving parts, built once per process."""

    config: ServerConfig
    base: BaseModel
    registry: Registry
    prompts: PromptCache
    admission: Admission
    scheduler: Scheduler
    jobs: TrainingJobs
    services: Services  # what the transports serve
    metrics: Metrics = field(default_factory=NoMetrics)
    metrics_port: int | None = None  # the bound /metrics port, once `start` serves it
    exposure: security.Exposure | None = None  # tokens and TLS, checked when the gRPC server is created
    http: HttpServer | None = None  # the OpenAI-compatible API, once `start` serves it
    host_loader: HostTierLoader | None = None  # fills the host tier in the background from `start` (--host-cache-mb)
    prefix_warmer: PrefixWarmer | None = None  # computes prefixes while the worker is idle, from `start` (--warm-prefixes)

    def start_work(self) -> None:
        """Starts the worker, training jobs and the background helpers (`start`, and each Ray Serve replica)."""
        self.scheduler.start()
        self.jobs.start()
        for helper in (self.host_loader, self.prefix_warmer):
            if helper is not None:
                helper.start()

    def stop_work(self, grace_s: float) -> None:
        """Once admission is closed: stops training jobs and the helpers, and gives in-flight requests up to
        `grace_s` to finish before failing them."""
        self.jobs.close()
        for helper in (self.host_loader, self.prefix_warmer):
            if helper is not None:
                helper.stop()
        self.scheduler.close(grace_s)

    @property
    def http_port(self) -> int | None:
        """The bound HTTP API port, once `start` serves it."""
        return None if self.http is None else self.http.port


def build_app(config: ServerConfig, base: BaseModel | None = None) -> App:
    """Loads the base model (unless given) and builds registry, caches, engine, scheduler, jobs and services.

    Raises UnsupportedModelError for a model the engine cannot serve exactly, before anything is built.
    """
    # The store first: one that cannot be reached fails the start before the (slow) model load.
    registry = Registry(store=CachedStore(
        open_store(config.store_url, endpoint_url=config.s3_endpoint_url,
                   cache_dir=(config.cache_dir or default_cache_dir()) / "store-files"),
        refresh_s=config.store_refresh_s))
    base = base or load_base_model(config.model, device=config.device, dtype=config.dtype, cache_dir=config.cache_dir,
                                   attn_implementation=config.attn_implementation)
    check_servable(base, allow_untested=config.allow_untested_model)
    # Resolved after the weights are loaded: a fraction is of the device memory they leave free.
    engine = Engine(base, prefix_cache_bytes=int(config.prefix_cache_mb * 1024 * 1024),
                    cuda_graphs=config.cuda_graphs and base.device.type == "cuda",
                    packed_linears=config.packed_linears and packing_available(base.device, base.dtype),
                    paged_kernel=None if config.paged_kernel else False, mixed_steps=config.mixed_steps,
                    kv_cache_bytes=resolve_kv_cache_bytes(config.kv_cache, base.device),
                    # Graphs for every batch size and for rows as long as a request may make them.
                    capture=(config.max_batch_size,
                             config.max_virtual_tokens + config.max_input_tokens + config.max_new_tokens))
    kv = engine.kv_usage()
    log.info("KV cache: %.2f GiB for %d tokens in %d blocks of %d, %d bytes per token (--kv-cache-memory %s)",
             kv.total_bytes / (1 << 30), kv.total_tokens, kv.total_blocks, kv.block_size, kv.bytes_per_token,
             config.kv_cache_memory)
    host = HostTier(int(config.host_cache_mb * 1024 * 1024), base.dtype) if config.host_cache_mb > 0 else None
    prompts = PromptCache(int(config.prompt_cache_mb * 1024 * 1024), base.device, base.dtype, host=host)
    scheduler = Scheduler(
        engine,
        max_batch_size=config.max_batch_size,
        max_queued=config.max_queued_requests,
        max_prefill_tokens=config.max_prefill_tokens,
        batch_wait_s=config.batch_wait_ms / 1000,
        side_share=config.train_share,
        # A policy file that does not parse fails the start here; later edits are re-read (or on SIGHUP).
        fair=FairShare(PolicyFile(config.task_policy), key=config.fair_share, preempt=config.fair_preemption,
                       wait=config.fair_preemption_wait),
    )
    admission = Admission(engine, registry, prompts, config)
    host_loader = None if host is None else HostTierLoader(registry, host)
    warmer = (PrefixWarmer(registry, admission, engine, scheduler, loader=host_loader) if config.warm_prefixes
              else None)
    prompt_service = PromptService(registry, admission, engine, prompts, scheduler,
                                   max_virtual_tokens=config.max_virtual_tokens, warmer=warmer)
    # Versions that training jobs register are warmed like uploads.
    jobs = TrainingJobs(base, registry, scheduler, max_jobs=config.max_training_jobs,
                        max_virtual_tokens=config.max_virtual_tokens, unit_rows=config.train_unit_rows,
                        on_registered=prompt_service.warm)
    # prometheus_client is imported only here and only with --metrics-port: it is optional.
    metrics = create_metrics(config.metrics_port is not None)
    metrics.watch(snapshot_reader(scheduler, prompt_tiers(prompts, engine.prefixes), jobs))
    services = Services(InferenceService(admission, scheduler, base, config, metrics), prompt_service,
                        TrainingService(jobs))
    # The model is served from the scheduler's worker thread: this one hands its OpenMP threads back (core/omp.py).
    omp.release_pool()
    return App(config, base, registry, prompts, admission, scheduler, jobs, services, metrics,
               host_loader=host_loader, prefix_warmer=warmer)


def create_server(app: App) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Creates a started-ready gRPC server with every service, health and reflection; returns the bound port."""
    cfg = app.config
    exposure = app.exposure = security.prepare(cfg)
    interceptors = [] if exposure.tokens is None else [auth.AuthInterceptor(exposure.tokens, auth.rules(_job_task(app.jobs)))]
    limit = max(4 << 20, cfg.max_upload_bytes * _HARD_MESSAGE_FACTOR)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.rpc_workers, thread_name_prefix="softprompt-rpc"),
        # Past this many RPCs in flight gRPC answers RESOURCE_EXHAUSTED itself, before any thread blocks.
        maximum_concurrent_rpcs=cfg.rpc_workers,
        # SO_REUSEPORT off (gRPC turns it on): a second server on a busy port must fail to bind, not share it.
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                 ("grpc.so_reuseport", 0)],
        # Observing first: it also counts (and ids) the RPCs that authentication refuses.
        # Then undecodable request bytes answer INVALID_ARGUMENT (gRPC itself would say INTERNAL).
        interceptors=[ObservingInterceptor(app.metrics), DecodeErrorInterceptor(), *interceptors],
    )
    services = app.services
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(services.inference), server)
    pb_grpc.add_RegistryServicer_to_server(RegistryServicer(services.prompts, cfg.max_upload_bytes), server)
    pb_grpc.add_TrainingServicer_to_server(TrainingServicer(services.training, cfg.max_upload_bytes), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{cfg.host}:{cfg.port}"
    try:
        if exposure.credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, exposure.credentials)
    except RuntimeError:  # grpcio raises where older releases returned 0
        port = 0
    if port == 0:
        check_free(cfg.host, cfg.port, "--port", "the gRPC server")  # raises PortInUseError if that is why
        raise OSError(f"could not bind the gRPC server to {cfg.host}:{cfg.port}: is {cfg.host} an address of this "
                      "machine? choose another with --host or --port")
    security.log_exposure(cfg, exposure, port)
    return server, port, health_servicer


def http_transport() -> tuple[Callable[..., Any], type[HttpServer]]:
    """The HTTP API's app factory and server, imported only when --http-port switches it on.

    Its packages (fastapi, uvicorn, sse-starlette) are the server extra's, not the GPU image's; gRPC alone needs
    none of them, as only an s3:// store needs boto3 and only --metrics-port prometheus_client.
    """
    try:
        from softprompt.server.http_api.app import create_http_app
        from softprompt.server.http_api.server import HttpServer
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"the OpenAI-compatible HTTP API needs {exc.name}: pip install 'softprompt[server]', "
                                  "or --http-port off to serve gRPC alone", name=exc.name) from exc
    return create_http_app, HttpServer


def _job_task(jobs: TrainingJobs) -> auth.JobTask:
    def task(job_id: str) -> str | None:
        try:
            return jobs.get(job_id).task
        except TrainingJobNotFoundError:
            return None
    return task


def start(app: App) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Starts the scheduler, a gRPC server and (unless --http-port is off) the HTTP API for `app`."""
    server, port, health_servicer = create_server(app)
    cfg = app.config
    if cfg.http_port is not None:
        assert app.exposure is not None
        create_http_app, http_server = http_transport()
        api = create_http_app(app.services, tokens=app.exposure.tokens, max_body_bytes=cfg.max_upload_bytes,
                              metrics=app.metrics)
        app.http = http_server(api, cfg.host, cfg.http_port, tls_cert=cfg.tls_cert, tls_key=cfg.tls_key,
                              tls_client_ca=cfg.tls_client_ca)
        app.http.start()
        scheme = "https" if cfg.tls_cert is not None else "http"
        log.info("OpenAI-compatible API on %s://%s:%d/v1", scheme, cfg.host, app.http.port)
    if app.config.metrics_port is not None:
        try:
            app.metrics_port = app.metrics.serve(app.config.host, app.config.metrics_port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise PortInUseError(in_use_message(app.config.host, app.config.metrics_port, "--metrics-port",
                                                "the metrics endpoint", off=True)) from None
        log.info("metrics on http://%s:%d/metrics", app.config.host, app.metrics_port)
    app.start_work()
    server.start()
    return server, port, health_servicer


def shutdown(app: App, server: grpc.Server, health_servicer: health.HealthServicer, grace_s: float) -> None:
    """Drains: new requests refused and health NOT_SERVING at once, training jobs stopped, in-flight
    requests given up to `grace_s` to finish (then failed with UNAVAILABLE), then the port closed."""
    # Admission closes before health flips, so nothing is admitted once health says NOT_SERVING; it also
    # stops a training job at its next unit of work rather than letting it queue more behind the drain.
    app.scheduler.stop_admitting()
    health_servicer.enter_graceful_shutdown()
    app.stop_work(grace_s)
    if app.http is not None:
        app.http.stop()
    server.stop(grace=1.0).wait()
    app.metrics.close()


def serve(config: ServerConfig, grace_s: float = 30.0) -> None:
    """Runs the server until SIGINT or SIGTERM, then drains."""
    # Handlers first: a SIGTERM that lands while the model loads or right after the port opens (an
    # orchestrator cancelling a rollout) must drain, not kill the process with the default action.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    reload = threading.Event()  # SIGHUP: re-read --task-policy (in the main loop, not in the handler)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: reload.set())
    if config.http_port is not None:
        http_transport()  # a missing package fails the start before the (slow) model load
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    app = build_app(config)
    server, port, health_servicer = start(app)
    spec = app.base.spec
    log.info("serving %s (%s, %s, fingerprint %s) on %s:%d; prompt store %s", spec.model_id, app.base.device,
             str(app.base.dtype).removeprefix("torch."), spec.fingerprint, config.host, port, config.store_url)
    # Never one untimed wait: Python runs signal handlers only in the main thread, and a signal the kernel
    # hands to one of the many other threads does not interrupt a blocked wait here, so SIGTERM would be
    # lost until some other signal arrived. Waking up twice a second lets the handler run.
    while not stop.wait(0.5):
        if reload.is_set():
            reload.clear()
            app.scheduler.fair.policy.reload()
    log.info("shutting down: finishing in-flight requests for up to %.0f s", grace_s)
    shutdown(app, server, health_servicer, grace_s)
