"""`softprompt serve`: flags -> ServerConfig -> a running server."""

from __future__ import annotations

import argparse

from softprompt.prompts.errors import StoreUnavailableError
from softprompt.server import config as server_config
from softprompt.server.app.ports import check_ports
from softprompt.server.core.errors import UnsupportedModelError
from softprompt.server.core.policy import load_policy
from softprompt.server.observability import logs
from softprompt.server.grpc_api import exposure as security

EPILOG = """\
examples:
  softprompt serve                                  # embedded SmolLM2-135M-Instruct on localhost:50051
  softprompt serve --model ./my-model --device cuda # any Hugging Face causal LM folder or hub id
  softprompt serve --port 0 --store /srv/prompts    # a free port (logged) and a shared prompt store
  softprompt serve --store s3://team-prompts/prod --s3-endpoint-url http://minio:9000
                                                    # a registry on object storage, shared by every replica
  softprompt serve --http-port off                  # gRPC only (the OpenAI-compatible API is on :8000 by default)
  softprompt serve --metrics-port 9464              # Prometheus metrics on http://localhost:9464/metrics
  softprompt serve --host 0.0.0.0 --auth-tokens tokens.txt --tls-cert cert.pem --tls-key key.pem
                                                    # remote clients: bearer tokens over TLS

Every port flag takes a port number, 0 for a free port (logged), or 'off' for the listeners that may be off
(--http-port, --metrics-port). A port another process listens on is refused before the model loads.

Without --auth-tokens the server requires no token and refuses any --host but this machine's.
Make tokens and their file lines with `softprompt token new ROLE [TASK_PATTERN...]`.

The first start with the default model converts its GGUF file into a safetensors cache (about
30 s); later starts load it in about a second. Check health with:
  grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check
"""


def build_parser() -> argparse.ArgumentParser:
    """The `serve` argument parser."""
    parser = argparse.ArgumentParser(
        prog="softprompt serve",
        description="Serve one frozen causal LM and every soft prompt in a registry over gRPC and OpenAI's HTTP "
                    "API, batching requests of different tasks together.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    server_config.add_arguments(parser)
    parser.add_argument("--grace", type=float, default=30.0, help="seconds in-flight requests get on shutdown (default: 30)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `softprompt serve`."""
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    try:
        config = server_config.from_args(args)
        # Bad security flags and busy ports fail here, before the (slow) model load; the server checks them again.
        security.prepare(config)
        check_ports(config)
        if config.task_policy is not None:
            load_policy(config.task_policy)  # a policy file that does not parse stops the start
    except (ValueError, OSError) as exc:
        raise SystemExit(f"softprompt serve: {exc}") from None
    from softprompt.server.app.server import serve  # imports torch: only once the flags are known to be good

    try:
        serve(config, grace_s=args.grace)
    except (UnsupportedModelError, StoreUnavailableError, OSError, ValueError, ModuleNotFoundError) as exc:
        # Refused before serving (a model it cannot serve exactly, a store it cannot reach or a URL it does not
        # support, a KV cache too small for one block, a port in use, the HTTP API's packages missing): the reason,
        # not a traceback.
        raise SystemExit(f"softprompt serve: {exc}") from None
    return 0
