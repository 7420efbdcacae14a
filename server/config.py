"""Server settings: one frozen dataclass, built once from command-line flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any
from pathlib import Path

from softprompt.server.kv_memory import KvCacheMemory, parse_kv_cache_memory
from softprompt.server.core.families import SUPPORTED_ATTENTION
from softprompt.server.core.fairness import FairShareKey


def default_store_dir() -> Path:
    """$XDG_DATA_HOME/softprompt/prompts or ~/.local/share/softprompt/prompts."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "softprompt" / "prompts"


def default_cache_dir() -> Path:
    """Where converted models and built kernels live: $XDG_CACHE_HOME/softprompt or ~/.cache/softprompt."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "softprompt"


def setting(default: Any, help: str, parse: Any = None) -> Any:
    """A settings field with its `--help` text beside it: `add_arguments` builds each flag from these.

    `parse` turns the flag's text into the value, where the type of the default does not tell how.
    """
    return field(default=default, metadata={"help": help, "parse": parse})


# One rule for every port flag (--port, --http-port, --metrics-port), parsed by `parse_port` alone:
# a number 1-65535 is that port; 0 picks a free port (the log says which), as the OS does for port 0;
# `off` turns a listener off, for the listeners that may be off (not gRPC's). 0 does not mean "off":
# a test or a second local server asking for any free port is common, and a port no one can guess is
# still a listener.
OFF = "off"


def parse_port(text: str, *, can_be_off: bool) -> int | None:
    """A port flag's value: a port number 0-65535 (0: a free one), or None for `off` where `can_be_off`.

    Raises argparse.ArgumentTypeError (argparse then names the flag) for anything else.
    """
    value = text.strip().lower()
    if value == OFF:
        if can_be_off:
            return None
        raise argparse.ArgumentTypeError("this listener cannot be turned off: give a port number (0 picks a free one)")
    expected = "a port number 0-65535 (0 picks a free port)" + (" or 'off'" if can_be_off else "")
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return int(value)


def port(text: str) -> int:
    """The value of a port flag whose listener is always on (--port)."""
    value = parse_port(text, can_be_off=False)
    assert value is not None
    return value


def port_or_off(text: str) -> int | None:
    """The value of a port flag whose listener may be off (--http-port, --metrics-port): None for `off`."""
    return parse_port(text, can_be_off=True)


def _fair_share_key(text: str) -> FairShareKey:
    try:
        return FairShareKey.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@dataclass(frozen=True)
class ServerConfig:
    """Everything `softprompt serve` can be told. Defaults suit the embedded default model on a laptop."""

    host: str = setting("127.0.0.1", 'address to bind (use 0.0.0.0 to accept remote clients)')
    port: int = setting(50051, 'gRPC port to listen on; 0 picks a free one and logs it', parse=port)
    http_port: int | None = setting(
        8000,
        'port of the OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions, /v1/classify), '
        "on --host beside gRPC, with the same tokens, TLS files and limits; 0 picks a free one and logs it; 'off' "
        'turns it off',
        parse=port_or_off,
    )
    model: str | None = setting(
        None,
        'Hugging Face model id or local folder; default: the embedded SmolLM2-135M-Instruct',
    )
    device: str | None = setting(None, 'torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)')
    dtype: str | None = setting(None, 'float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)')
    attn_implementation: str | None = setting(
        None,
        "the model's attention kernel: sdpa or eager (default: sdpa where the model has it, else eager); the "
        "engine's masks suit no other",
    )
    allow_untested_model: bool = setting(
        False,
        'serve a model type outside the tested families (README, Supported models) if a startup exactness '
        'probe finds the engine reproduces its own forward',
    )
    store: str | Path | None = setting(
        None,
        'prompt registry: a folder (default: ~/.local/share/softprompt/prompts), or s3://BUCKET/PREFIX on AWS S3, '
        'MinIO or any S3-compatible store (credentials from the standard AWS configuration; see --s3-endpoint-url), '
        'which many servers share',
    )
    s3_endpoint_url: str | None = setting(
        None,
        'endpoint of an s3:// --store that is not AWS (MinIO, Ceph, ...), e.g. http://minio:9000 (default: the AWS '
        'configuration, $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)',
    )
    store_refresh_s: float = setting(
        1.0,
        "how stale this server's view of the registry may get: a version registered, an alias moved or a version "
        'deleted through another server is seen here within this many seconds (a version named explicitly, '
        "'task@7', is read at once); 0 reads the store on every request",
    )
    cache_dir: Path | None = setting(None, 'where the converted default model is kept (default: ~/.cache/softprompt)')
    max_batch_size: int = setting(32, 'most requests decoded together in one step')
    max_queued_requests: int = setting(256, 'requests waiting beyond the running batch before RESOURCE_EXHAUSTED')
    fair_share: FairShareKey = setting(
        FairShareKey.TASK,
        'what the batch is shared fairly between: task (each task gets its --task-policy weight of the rows and '
        "tokens while it has requests waiting), token (each caller's token, weight 1 each), or off (arrival "
        'order); priorities apply in every case',
        parse=_fair_share_key,
    )
    fair_preemption: bool = setting(
        True,
        'let a waiting request preempt a running row (which resumes later with the same tokens) when the row is '
        "less urgent, or its task holds more than its share of the batch while the waiting request's holds less "
        '(--no-fair-preemption: fair share and priorities order admission only)',
    )
    fair_preemption_wait: float = setting(
        0.0,
        'a request under its fair share waits for a running row to end, rather than preempt one, when a row ends '
        "within this fraction of the request's max_new_tokens (in decode steps): fewer recomputes, a later first "
        'token (0: never waits, the default). A more urgent request never waits',
    )
    task_policy: Path | None = setting(
        None,
        "TOML or YAML file of per-task weights, caps (running rows, queued requests), token-rate limits and default "
        'priorities, by task patterns as in the token file (see README, Sharing the server); re-read when it '
        'changes or on SIGHUP. Without it: weight 1, no caps, priority 0 for every task',
    )
    max_new_tokens: int = setting(1024, 'largest max_new_tokens a request may ask for')
    default_max_new_tokens: int = setting(64, 'max_new_tokens when a request leaves it at 0')
    max_input_tokens: int = setting(2048, 'longest input, in tokens, after the chat template')
    max_virtual_tokens: int = setting(256, 'longest soft prompt accepted at registration')
    max_prefill_tokens: int = setting(
        4096,
        "most positions one prefill computes, rows padded to the longest: rows x the longest row's positions "
        'outside its cached prompt prefix (bounds latency spikes)',
    )
    kv_cache_memory: str = setting(
        "auto",
        "memory for the KV cache, the keys and values of every running request, reserved once at startup: a "
        "size (24GiB, 512MiB, 2GB, or bytes), a fraction in (0, 1] of the device memory free after the weights "
        "are loaded (0.8), or auto (0.8 on CUDA, 2GiB on CPU). It bounds the tokens running requests hold at "
        "once: a request whose input plus max_new_tokens could never fit is refused with INVALID_ARGUMENT; "
        "rows beyond what is free wait in the queue, or running ones are preempted and recomputed later",
    )
    batch_wait_ms: float = setting(2.0, 'when idle, how long to gather arriving requests into one prefill')
    prompt_cache_mb: float = setting(256.0, 'device memory for cached prompt tensors (LRU)')
    host_cache_mb: float = setting(
        2048.0,
        "host memory for every registered version's prompt matrix, in the serving dtype: filled at registration "
        'and, in the background, from the store at start, so a task never served yet starts as fast as any; '
        'past it, the least recently used are evicted and read from the store again when asked for (ModelInfo '
        'and /metrics show what it holds); 0 turns the tier off',
    )
    prefix_cache_mb: float = setting(
        1024.0,
        "device memory for the cached keys/values of prompts' virtual tokens (LRU); a cached prompt's virtual"
        ' tokens are not recomputed at prefill',
    )
    warm_prefixes: bool = setting(
        True,
        "compute the prefix keys/values of each task's served version (and alias targets) while the worker is "
        'idle: after start, and for registrations that arrived faster than the worker warmed them, until '
        '--prefix-cache-mb is full, so a task never served yet starts as fast as a served one (--no-warm-prefixes:'
        ' each first request computes its own)',
    )
    max_upload_mb: float = setting(64.0, 'largest RegisterPrompt upload')
    max_stop_sequences: int = setting(16, 'most stop sequences per request')
    max_labels: int = setting(64, 'most candidate labels per Classify request')
    train_share: float = setting(
        0.25,
        "share of the model's time training jobs get while requests are being served (an idle server gives "
        'them all of it)',
    )
    train_unit_rows: int = setting(
        2,
        'training examples per unit of work between two serving steps (smaller: shorter pauses in serving, '
        'slower training; the result is the same)',
    )
    max_training_jobs: int = setting(
        8,
        'training jobs queued or running before TrainPrompt answers RESOURCE_EXHAUSTED',
    )
    cuda_graphs: bool = setting(
        True,
        'on a GPU, replay decode steps from captured CUDA graphs (--no-cuda-graphs: run them eagerly)',
    )
    torch_threads: int = setting(
        0,
        "threads the model's CPU kernels use (torch.set_num_threads); 0: torch's default, one per core. Fewer "
        'leave cores to the gRPC and HTTP threads that stream the answers',
    )
    paged_kernel: bool = setting(
        True,
        'on a CPU in float32 with SDPA attention, forwards attend over the KV blocks where they lie with a '
        'kernel built once per machine (~30 s, with the C++ compiler torch extensions use; cached under '
        '--cache-dir); --no-paged-kernel: gather each row\'s keys and values per layer and run SDPA',
    )
    mixed_steps: bool = setting(
        True,
        'with the paged kernel, prefill arriving requests (and the next chunk of a long one) in the forward of '
        'the running rows\' decode step, as one ragged batch of positions, so the weights are read once for both '
        '(16 streams on the default model: a step with an arrival 145 -> 100 ms); --no-mixed-steps: prefill in '
        'a forward of its own before each decode step',
    )
    packed_linears: bool = setting(
        True,
        'on a CPU in float32, run the linear layers on weights packed once for oneDNN (decode steps 1.4-2x '
        "faster on the 2-core EPYC BENCHMARKS.md names; the packed copy takes the weights' size again in memory; "
        "--no-packed-linears: the model's own kernels)",
    )
    workers: int = setting(0, 'gRPC threads, i.e. RPCs in flight before RESOURCE_EXHAUSTED (0: batch + queue + 8)')
    auth_tokens: Path | None = setting(
        None,
        'file of bearer tokens with roles (see README, Security); without it the server requires no token and'
        ' listens on localhost only',
    )
    tls_cert: Path | None = setting(None, 'PEM certificate chain the server presents (with --tls-key)')
    tls_key: Path | None = setting(None, 'PEM private key of --tls-cert')
    tls_client_ca: Path | None = setting(None, 'PEM CA bundle: require client certificates signed by it (mutual TLS)')
    metrics_port: int | None = setting(
        None,
        "serve Prometheus metrics over HTTP on this port (/metrics); 0 picks a free one and logs it; 'off' (the "
        'default) serves none',
        parse=port_or_off,
    )

    def __post_init__(self) -> None:
        # Built from code too (tests, Ray): the key's name is taken for the key.
        object.__setattr__(self, "fair_share", FairShareKey.parse(str(self.fair_share)))
        for name in ("max_batch_size", "max_queued_requests", "max_new_tokens", "default_max_new_tokens",
                     "max_input_tokens", "max_virtual_tokens", "max_prefill_tokens", "max_labels",
                     "max_training_jobs", "train_unit_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
        if self.store_refresh_s < 0:
            raise ValueError(f"store_refresh_s must be >= 0 seconds, got {self.store_refresh_s}")
        if self.host_cache_mb < 0:
            raise ValueError(f"host_cache_mb must be >= 0 MiB (0: no host tier), got {self.host_cache_mb}")
        if not 0.0 < self.train_share <= 1.0:
            raise ValueError(f"train_share must be within (0, 1], got {self.train_share}")
        if not 0.0 <= self.fair_preemption_wait <= 1.0:
            raise ValueError(f"fair_preemption_wait must be within [0, 1] (a fraction of max_new_tokens), got "
                             f"{self.fair_preemption_wait}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be 0..65535 (0 picks a free port) or None (off), got {self.http_port}")
        if self.http_port and self.http_port == self.port:
            raise ValueError(f"--http-port and --port are both {self.port}: give the HTTP API a port of its own")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0..65535 (0 picks a free port) or None (off), got {self.metrics_port}")
        if self.metrics_port and self.metrics_port in (self.port, self.http_port):
            raise ValueError(f"--metrics-port {self.metrics_port} is also --port or --http-port: give the metrics "
                             "endpoint a port of its own")
        if self.attn_implementation not in (None, *SUPPORTED_ATTENTION):
            raise ValueError(f"attn_implementation must be one of {', '.join(SUPPORTED_ATTENTION)}, got "
                             f"{self.attn_implementation!r}: the engine's attention masks suit no other kernel")
        parse_kv_cache_memory(self.kv_cache_memory)  # raises ValueError saying what the flag accepts
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535 (0 picks a free port), got {self.port}")

    @property
    def store_url(self) -> str:
        """The prompt store in effect: a folder path or an s3:// URL."""
        return str(self.store or default_store_dir())

    @property
    def kv_cache(self) -> KvCacheMemory:
        """The KV cache budget as given (bytes, a fraction, or auto); resolved to bytes once the model is loaded."""
        return parse_kv_cache_memory(self.kv_cache_memory)

    @property
    def rpc_workers(self) -> int:
        """gRPC threads: a synchronous server holds one per RPC in flight, queued ones included."""
        return self.workers or self.max_batch_size + self.max_queued_requests + 8

    @property
    def max_upload_bytes(self) -> int:
        """Largest accepted RegisterPrompt message, in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per ServerConfig field, with its default and help."""
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=default,
                                action=argparse.BooleanOptionalAction, help=f.metadata["help"] + f" (default: {default})")
            continue
        kind = f.metadata["parse"] or {int: int, float: float}.get(type(default), str)
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=default,
                            help=f.metadata["help"] + shown)


def from_args(args: argparse.Namespace) -> ServerConfig:
    """Builds the config from parsed flags."""
    values = {f.name: getattr(args, f.name) for f in fields(ServerConfig)}
    for name in ("cache_dir", "auth_tokens", "tls_cert", "tls_key", "tls_client_ca", "task_policy"):
        if values[name] is not None:
            values[name] = Path(values[name]).expanduser()
    if values["store"] is not None and "://" not in values["store"]:
        values["store"] = Path(values["store"]).expanduser()  # a URL stays as written
    return ServerConfig(**values)
