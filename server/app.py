"""Wires the parts together: `build_app` loads the model, `create_server` binds gRPC, `serve` runs it."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from softprompt.prompts.registry import Registry
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc
from softprompt.server.admission import Admission
from softprompt.server.config import ServerConfig
from softprompt.server.engine import Engine
from softprompt.server.model import BaseModel, load_base_model
from softprompt.server.prompt_cache import PromptCache
from softprompt.server.scheduler import Scheduler
from softprompt.server.service import InferenceService, RegistryService, TrainingService
from softprompt.server.training import TrainingJobs

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


def build_app(config: ServerConfig, base: BaseModel | None = None) -> App:
    """Loads the base model (unless given) and builds registry, cache, engine and scheduler."""
    base = base or load_base_model(config.model, device=config.device, dtype=config.dtype, cache_dir=config.cache_dir)
    engine = Engine(base, prefix_cache_bytes=int(config.prefix_cache_mb * 1024 * 1024))
    registry = Registry(config.store_dir)
    prompts = PromptCache(int(config.prompt_cache_mb * 1024 * 1024), base.device, base.dtype)
    scheduler = Scheduler(
        engine,
        max_batch_size=config.max_batch_size,
        max_queued=config.max_queued_requests,
        max_prefill_tokens=config.max_prefill_tokens,
        batch_wait_s=config.batch_wait_ms / 1000,
        side_share=config.train_share,
    )
    jobs = TrainingJobs(base, registry, scheduler, max_jobs=config.max_training_jobs,
                        max_virtual_tokens=config.max_virtual_tokens, unit_rows=config.train_unit_rows)
    return App(config, base, registry, prompts, Admission(engine, registry, prompts, config), scheduler, jobs)


def create_server(app: App) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Creates a started-ready gRPC server with every service, health and reflection; returns the bound port."""
    cfg = app.config
    limit = max(4 << 20, cfg.max_upload_bytes * _HARD_MESSAGE_FACTOR)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.rpc_workers, thread_name_prefix="softprompt-rpc"),
        # Past this many RPCs in flight gRPC answers RESOURCE_EXHAUSTED itself, before any thread blocks.
        maximum_concurrent_rpcs=cfg.rpc_workers,
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
    )
    pb_grpc.add_InferenceServicer_to_server(InferenceService(app.admission, app.scheduler, cfg), server)
    pb_grpc.add_RegistryServicer_to_server(RegistryService(app.registry, app.admission, app.prompts, cfg), server)
    pb_grpc.add_TrainingServicer_to_server(TrainingService(app.jobs, cfg), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if port == 0:
        raise OSError(f"could not bind {cfg.host}:{cfg.port}: is another server using the port?")
    return server, port, health_servicer


def start(app: App) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Starts the scheduler and a gRPC server for `app`."""
    server, port, health_servicer = create_server(app)
    app.scheduler.start()
    app.jobs.start()
    server.start()
    return server, port, health_servicer


def shutdown(app: App, server: grpc.Server, health_servicer: health.HealthServicer, grace_s: float) -> None:
    """Drains: health NOT_SERVING, training jobs cancelled, in-flight requests finish within `grace_s`."""
    health_servicer.enter_graceful_shutdown()
    app.jobs.close()
    app.scheduler.close(grace_s)
    server.stop(grace=1.0).wait()


def serve(config: ServerConfig, grace_s: float = 30.0) -> None:
    """Runs the server until SIGINT or SIGTERM, then drains."""
    app = build_app(config)
    server, port, health_servicer = start(app)
    spec = app.base.spec
    log.info("serving %s (%s, %s, fingerprint %s) on %s:%d; prompt store %s", spec.model_id, app.base.device,
             str(app.base.dtype).removeprefix("torch."), spec.fingerprint, config.host, port, config.store_dir)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down: finishing in-flight requests for up to %.0f s", grace_s)
    shutdown(app, server, health_servicer, grace_s)
