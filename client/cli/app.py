"""The top of the `softprompt` command: its parser, the global options, dispatch and error reporting.

`main` hands the server-side commands (`handoff.COMMANDS`) their argv untouched, before argparse
runs; every other command is parsed here and run by its module's handler with a connected Client.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from softprompt.client.cli import handoff, inference, jobs, registry, serving, training
from softprompt.client.cli.parsing import Handler, option, positive_float
from softprompt.client.client import DEFAULT_TARGET, Client
from softprompt.client.credentials import TlsOptions
from softprompt.client.errors import SoftpromptError

SERVER_ENV = "SOFTPROMPT_SERVER"
TOKEN_ENV = "SOFTPROMPT_TOKEN"

# Global options that take a value; the pre-scan for server-side commands must skip their values.
_VALUED_GLOBALS = ("--server", "--timeout", "--token", "--token-file", "--ca-cert", "--client-cert", "--client-key")
_FLAG_GLOBALS = ("--json", "--tls")

_MAIN_DESCRIPTION = """\
Run one frozen base language model with many soft prompts (prompt-tuning adapters).

Start a server with `softprompt serve` (gRPC on localhost:50051, OpenAI's HTTP API on
http://localhost:8000/v1), train prompts on it (`softprompt train`) or register ready-made ones
(PEFT adapters or raw tensors) under task names, then generate or classify with them, or fetch a
version's files (`softprompt export`). Prompts are referenced as NAME (newest version), NAME@3
(a version) or NAME@ALIAS (e.g. NAME@prod)."""

_MAIN_EPILOG = f"""\
examples:
  softprompt serve --help
  softprompt train --task sentiment --data train.jsonl --promote prod
  softprompt register sentiment ./sentiment-adapter --tag lang=en
  softprompt alias sentiment prod 1
  softprompt generate sentiment@prod "I loved this film"
  softprompt classify sentiment@prod "I loved this film" --labels positive,negative
  softprompt jobs list
  softprompt export sentiment@prod ./sentiment-prod
  softprompt list --json
  softprompt --server gpu-box:50051 --tls --ca-cert ca.pem --token-file my-token info

The server address comes from --server, else ${SERVER_ENV}, else {DEFAULT_TARGET}. For a server
started with --auth-tokens, the token comes from --token, else --token-file, else ${TOKEN_ENV}
(`softprompt token --help` explains tokens and roles).
Run `softprompt COMMAND --help` for each command's options."""


# ---------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line `argv` (default: sys.argv[1:]) and returns the exit status.

    0 on success, 1 when the command fails (server error, unreadable file), 2 on usage errors.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    handed_off = _handed_off_argv(args_list)
    try:
        if handed_off is not None:
            return handoff.run_command(*handed_off)
        args = build_parser().parse_args(args_list)
        return _run(args)
    except SystemExit as e:  # argparse's --help and usage errors: report, don't exit the caller
        return _exit_code(e)
    except KeyboardInterrupt:
        return 130


def _handed_off_argv(argv: list[str]) -> tuple[str, list[str]] | None:
    """Returns (command, the arguments after it) if the command is a server-side one, else None.

    These are dispatched before argparse so that every flag, --help included, reaches the
    command's own parser (on the server side) untouched.
    """
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in _VALUED_GLOBALS:
            i += 2
        elif token in _FLAG_GLOBALS or token.startswith(tuple(f"{g}=" for g in _VALUED_GLOBALS)):
            i += 1
        else:
            return (token, argv[i + 1 :]) if token in handoff.COMMANDS else None
    return None


def _run(args: argparse.Namespace) -> int:
    server = option(args, "server", os.environ.get(SERVER_ENV) or DEFAULT_TARGET)
    try:
        token, tls = _token(args), _tls(args)
        with Client(server, timeout=option(args, "timeout", None), token=token, tls=tls) as client:
            handler: Handler = args.handler
            return handler(client, args)
    except SoftpromptError as e:
        _print_server_error(e, server, tls=tls is not None)
    except (OSError, ValueError) as e:  # local input: a missing or malformed prompt file
        if isinstance(e, BrokenPipeError):
            return _quiet_broken_pipe()
        print(f"error: {e}", file=sys.stderr)
    return 1


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token, else the content of --token-file, else $SOFTPROMPT_TOKEN."""
    token: str | None = option(args, "token", None)
    path: Path | None = option(args, "token_file", None)
    if token is None and path is not None:
        token = path.expanduser().read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"the token file {path} is empty")
    return token if token is not None else os.environ.get(TOKEN_ENV) or None


def _tls(args: argparse.Namespace) -> TlsOptions | None:
    """TLS settings from --tls, --ca-cert, --client-cert and --client-key (each file implies --tls)."""
    ca, cert, key = (option(args, name, None) for name in ("ca_cert", "client_cert", "client_key"))
    if (cert is None) != (key is None):
        raise ValueError("--client-cert and --client-key must be given together")
    if not (option(args, "tls", False) or ca or cert):
        return None
    return TlsOptions(ca_cert=ca, client_cert=cert, client_key=key)


def _print_server_error(e: SoftpromptError, server: str, *, tls: bool) -> None:
    print(f"error: {e.code.name}: {e.details}", file=sys.stderr)
    hint = _hint(e, server, tls=tls)
    if hint:
        print(hint, file=sys.stderr)


# What gRPC itself says when no server answered (refused, unresolvable, closed): the only UNAVAILABLE that
# "is the server running?" explains. A server that answered UNAVAILABLE (its prompt store is down, it is
# shutting down) said why in its own words.
_UNREACHABLE = ("failed to connect", "connection refused", "dns resolution failed", "name resolution",
                "socket closed", "connection reset", "connections to all backends failing", "empty address list",
                "broken pipe", "handshake")


def _hint(e: SoftpromptError, server: str, *, tls: bool) -> str:
    """Advice for the error, only where its cause is likely; "" otherwise."""
    if e.code == grpc.StatusCode.UNAVAILABLE:
        if e.request_id is not None or not any(s in e.details.lower() for s in _UNREACHABLE):
            return ""
        return (f"is the server running at {server}? start it with `softprompt serve` "
                f"(or point --server / ${SERVER_ENV} at it)"
                + ("" if tls else "; if it uses TLS, add --tls (and --ca-cert for a private CA)"))
    if e.code == grpc.StatusCode.UNAUTHENTICATED:
        return f"pass a token with --token-file FILE, --token TOKEN or ${TOKEN_ENV}"
    if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "the call ran out of time; raise --timeout or omit it"
    if e.code == grpc.StatusCode.UNIMPLEMENTED and e.rpc.startswith("Training/"):
        # The one endpoint that serves inference and the registry but not training: a Ray Serve deployment.
        return (f"the endpoint at {server} does not serve training (a Ray Serve deployment serves inference and "
                "the registry only: a job would live in one replica); train in this process into the same prompt "
                "store with `softprompt train --store STORE ...`, or against a plain `softprompt serve` over that "
                "store (--server)")
    if e.code == grpc.StatusCode.UNIMPLEMENTED:
        return f"the server at {server} does not offer this call; is it older than this client?"
    return ""


def _quiet_broken_pipe() -> int:
    # The reader (e.g. `| head`) went away: point stdout at /dev/null so the interpreter's final
    # flush does not print a second BrokenPipeError.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 1


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """Builds the argparse parser of every command except the server-side commands' own flags."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="softprompt",
        description=_MAIN_DESCRIPTION,
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # The order here is the order of `softprompt --help`.
    serving.add_parsers(commands)
    registry.add_parsers(commands, common)
    inference.add_generate(commands, common)
    inference.add_classify(commands, common)
    training.add_train(commands, common)
    jobs.add_jobs(commands, common)
    inference.add_tokenize(commands, common)
    inference.add_info(commands, common)
    inference.add_top(commands, common)
    return parser


def _common_options() -> argparse.ArgumentParser:
    """The global options, accepted before the command and after it."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help=f"server address (default: ${SERVER_ENV} or {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--timeout",
        type=positive_float,
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help="deadline of each server call, except watching training jobs (default: none)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print machine-readable JSON instead of text",
    )
    auth = common.add_argument_group(
        "authentication and TLS",
        "for servers started with --auth-tokens and/or --tls-cert; the token is sent as\n"
        f"`authorization: Bearer TOKEN` and comes from --token, else --token-file, else ${TOKEN_ENV}",
    )
    auth.add_argument(
        "--token",
        default=argparse.SUPPRESS,
        help=f"bearer token (other local users can see arguments: prefer --token-file or ${TOKEN_ENV})",
    )
    auth.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="read the bearer token from FILE",
    )
    auth.add_argument(
        "--tls",
        action="store_true",
        default=argparse.SUPPRESS,
        help="connect with TLS, trusting the system's root certificates unless --ca-cert is given",
    )
    auth.add_argument(
        "--ca-cert",
        type=Path,
        metavar="PEM",
        default=argparse.SUPPRESS,
        help="CA certificate(s) that signed the server's certificate (implies --tls)",
    )
    auth.add_argument(
        "--client-cert",
        type=Path,
        metavar="PEM",
        default=argparse.SUPPRESS,
        help="this client's certificate, for servers that require one (mutual TLS; implies --tls)",
    )
    auth.add_argument(
        "--client-key",
        type=Path,
        metavar="PEM",
        default=argparse.SUPPRESS,
        help="the private key of --client-cert",
    )
    return common
