"""The `softprompt` command: start the server, manage and train prompts, and run them from the shell.

Every command except `serve`, `bench` and `train --store` talks to a running server through
`softprompt.client.Client` and imports only the standard library, grpcio, protobuf and the torch-free
`softprompt.prompts.options`, so it starts fast and installs light.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import grpc

from softprompt.client.client import DEFAULT_TARGET, Client
from softprompt.client.credentials import TlsOptions
from softprompt.client.errors import SoftpromptError
from softprompt.client.types import (
    ClassifyResult,
    EvalMetrics,
    ModelInfo,
    PromptInfo,
    StreamChunk,
    TrainingJob,
    Usage,
)
from softprompt.prompts.options import TrainingOptions

__all__ = ["main", "build_parser"]

SERVER_ENV = "SOFTPROMPT_SERVER"
TOKEN_ENV = "SOFTPROMPT_TOKEN"
BARE_MODEL_REF = "-"
STDIN_TEXT = "-"

Handler = Callable[[Client, argparse.Namespace], int]

# Top-level modules of the `server` extra (pyproject.toml) that a client-only install lacks.
_SERVER_EXTRAS = frozenset(
    {"torch", "numpy", "transformers", "peft", "safetensors", "gguf", "accelerate", "tqdm",
     "matplotlib", "grpc_health", "grpc_reflection"}
)

# Global options that take a value; the `serve`/`bench` pre-scan must skip their values.
_VALUED_GLOBALS = ("--server", "--timeout", "--token", "--token-file", "--ca-cert", "--client-cert", "--client-key")
_FLAG_GLOBALS = ("--json", "--tls")
# Commands that run server-side code with their own parser; main() hands them their argv untouched.
_HANDED_OFF = {
    "serve": "softprompt.server.cli",
    "bench": "softprompt.server.bench",
    "token": "softprompt.server.token_cli",
}

_MAIN_DESCRIPTION = """\
Run one frozen base language model with many soft prompts (prompt-tuning adapters).

Start a server with `softprompt serve`, train prompts on it (`softprompt train`) or register
ready-made ones (PEFT adapters or raw tensors) under task names, then generate or classify with
them. Prompts are referenced as NAME (newest version), NAME@3 (a version) or NAME@ALIAS
(e.g. NAME@prod)."""

_MAIN_EPILOG = f"""\
examples:
  softprompt serve --help
  softprompt train --task sentiment --data train.jsonl --promote prod
  softprompt register sentiment ./sentiment-adapter --tag lang=en
  softprompt alias sentiment prod 1
  softprompt generate sentiment@prod "I loved this film"
  softprompt classify sentiment@prod "I loved this film" --labels positive,negative
  softprompt jobs list
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
            return _server_side(*handed_off)
        args = build_parser().parse_args(args_list)
        return _run(args)
    except SystemExit as e:  # argparse's --help and usage errors: report, don't exit the caller
        return _exit_code(e)
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    server = _option(args, "server", os.environ.get(SERVER_ENV) or DEFAULT_TARGET)
    try:
        token, tls = _token(args), _tls(args)
        with Client(server, timeout=_option(args, "timeout", None), token=token, tls=tls) as client:
            handler: Handler = args.handler
            return handler(client, args)
    except SoftpromptError as e:
        _print_server_error(e, server, tls=tls is not None)
    except (OSError, ValueError) as e:  # local input: a missing or malformed prompt file
        if isinstance(e, BrokenPipeError):
            return _quiet_broken_pipe()
        print(f"error: {e}", file=sys.stderr)
    return 1


def _option(args: argparse.Namespace, name: str, default: Any) -> Any:
    # Global options may appear before or after the command, so both parsers leave them unset
    # (SUPPRESS) unless given; the default is applied here, once.
    return getattr(args, name, default)


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token, else the content of --token-file, else $SOFTPROMPT_TOKEN."""
    token: str | None = _option(args, "token", None)
    path: Path | None = _option(args, "token_file", None)
    if token is None and path is not None:
        token = path.expanduser().read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"the token file {path} is empty")
    return token if token is not None else os.environ.get(TOKEN_ENV) or None


def _tls(args: argparse.Namespace) -> TlsOptions | None:
    """TLS settings from --tls, --ca-cert, --client-cert and --client-key (each file implies --tls)."""
    ca, cert, key = (_option(args, name, None) for name in ("ca_cert", "client_cert", "client_key"))
    if (cert is None) != (key is None):
        raise ValueError("--client-cert and --client-key must be given together")
    if not (_option(args, "tls", False) or ca or cert):
        return None
    return TlsOptions(ca_cert=ca, client_cert=cert, client_key=key)


def _print_server_error(e: SoftpromptError, server: str, *, tls: bool) -> None:
    print(f"error: {e.code.name}: {e.details}", file=sys.stderr)
    if e.code == grpc.StatusCode.UNAVAILABLE:
        print(
            f"is the server running at {server}? start it with `softprompt serve` "
            f"(or point --server / ${SERVER_ENV} at it)"
            + ("" if tls else "; if it uses TLS, add --tls (and --ca-cert for a private CA)"),
            file=sys.stderr,
        )
    elif e.code == grpc.StatusCode.UNAUTHENTICATED:
        print(f"pass a token with --token-file FILE, --token TOKEN or ${TOKEN_ENV}", file=sys.stderr)
    elif e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        print("the call ran out of time; raise --timeout or omit it", file=sys.stderr)
    elif e.code == grpc.StatusCode.UNIMPLEMENTED:
        print(f"the server at {server} does not offer this call; is it older than this client?",
              file=sys.stderr)


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


# ---------------------------------------------------------------------- serve and bench


def _handed_off_argv(argv: list[str]) -> tuple[str, list[str]] | None:
    """Returns (command, the arguments after it) if the command is `serve` or `bench`, else None.

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
            return (token, argv[i + 1 :]) if token in _HANDED_OFF else None
    return None


def _server_side(command: str, argv: list[str]) -> int:
    try:
        # Imported only here: the server pulls in torch and transformers.
        status = importlib.import_module(_HANDED_OFF[command]).main(argv)
    except ModuleNotFoundError as e:
        return _missing_server_extra(e, command)
    return status if isinstance(status, int) else 0


def _missing_server_extra(e: ModuleNotFoundError, command: str) -> int:
    """Advises installing the server extras if `e` is about one of them; re-raises anything else."""
    # Only a missing optional dependency gets advice; any other import failure is a bug
    # whose traceback should stay visible.
    if (e.name or "").split(".")[0] not in _SERVER_EXTRAS:
        raise e
    print(
        f"error: cannot run `softprompt {command}` ({e}); install the server extras: "
        "pip install 'softprompt[server]'",
        file=sys.stderr,
    )
    return 1


# ---------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """Builds the argparse parser of every command except `serve`'s and `bench`'s own flags."""
    common = _common_options()
    parser = argparse.ArgumentParser(
        prog="softprompt",
        description=_MAIN_DESCRIPTION,
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(commands)
    _add_bench(commands)
    _add_token(commands)
    _add_register(commands, common)
    _add_list(commands, common)
    _add_show(commands, common)
    _add_delete(commands, common)
    _add_alias(commands, common)
    _add_generate(commands, common)
    _add_classify(commands, common)
    _add_train(commands, common)
    _add_jobs(commands, common)
    _add_tokenize(commands, common)
    _add_info(commands, common)
    return parser


def _common_options() -> argparse.ArgumentParser:
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
        type=_positive_float,
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


def _command(
    commands: Any,
    name: str,
    common: argparse.ArgumentParser,
    handler: Handler,
    summary: str,
    description: str,
    examples: str,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.set_defaults(handler=handler)
    return parser


def _add_serve(commands: Any) -> None:
    # Documentation only: main() hands `serve ...` to the server's parser before argparse runs.
    parser = commands.add_parser(
        "serve",
        help="start the gRPC server (see `softprompt serve --help`)",
        add_help=False,
    )
    parser.add_argument("server_argv", nargs=argparse.REMAINDER)
    parser.set_defaults(handler=lambda client, args: _server_side("serve", args.server_argv))


def _add_bench(commands: Any) -> None:
    # Documentation only, like `serve`: main() hands `bench ...` to softprompt.server.bench.
    parser = commands.add_parser(
        "bench",
        help="measure our engine and server against HF generate and PEFT (see `softprompt bench --help`)",
        add_help=False,
    )
    parser.add_argument("bench_argv", nargs=argparse.REMAINDER)
    parser.set_defaults(handler=lambda client, args: _server_side("bench", args.bench_argv))


def _add_token(commands: Any) -> None:
    # Documentation only, like `serve`: main() hands `token ...` to softprompt.server.token_cli.
    parser = commands.add_parser(
        "token",
        help="make bearer tokens for `serve --auth-tokens` (see `softprompt token --help`)",
        add_help=False,
    )
    parser.add_argument("token_argv", nargs=argparse.REMAINDER)
    parser.set_defaults(handler=lambda client, args: _server_side("token", args.token_argv))


def _add_register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "register",
        common,
        _cmd_register,
        "register a new version of a task's prompt",
        "Upload a soft prompt as the next version of TASK. PATH is either a PEFT adapter\n"
        "directory (save_pretrained output: adapter_config.json + adapter_model.safetensors,\n"
        "plus an optional softprompt.json recording base_model_fingerprint) or a .safetensors\n"
        "file holding a single [num_virtual_tokens, hidden_size] tensor (F32, F16 or BF16).\n"
        "Registration is refused if the prompt was made for another base model, unless --force.",
        "  softprompt register sentiment ./sentiment-adapter\n"
        "  softprompt register sentiment prompt.safetensors --description 'v2, lr 3e-2' \\\n"
        "      --tag lang=en --tag dataset=sst2\n",
    )
    parser.add_argument("task", metavar="TASK", help="task name, e.g. sentiment")
    parser.add_argument("path", metavar="PATH", help="PEFT adapter directory or .safetensors file")
    parser.add_argument("--description", default="", help="free text stored with the version")
    parser.add_argument(
        "--tag",
        dest="tags",
        action="append",
        type=_tag,
        default=[],
        metavar="KEY=VALUE",
        help="a label stored with the version (repeatable)",
    )
    parser.add_argument(
        "--fingerprint",
        default="",
        metavar="FP",
        help="fingerprint of the base model the prompt was made for (see `softprompt info`)",
    )
    parser.add_argument(
        "--force", action="store_true", help="register even if made for another base model"
    )


def _add_list(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "list",
        common,
        _cmd_list,
        "list registered prompt versions",
        "List every version of TASK, or of all tasks (tasks by name, newest version first).",
        "  softprompt list\n  softprompt list sentiment\n  softprompt list --json\n",
    )
    parser.add_argument("task", metavar="TASK", nargs="?", help="only this task's versions")


def _add_show(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "show",
        common,
        _cmd_show,
        "describe one prompt version",
        "Describe the version REF resolves to: NAME (newest), NAME@N or NAME@ALIAS.",
        "  softprompt show sentiment\n  softprompt show sentiment@prod --json\n",
    )
    parser.add_argument("ref", metavar="REF", help="NAME, NAME@N or NAME@ALIAS")


def _add_delete(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "delete",
        common,
        _cmd_delete,
        "delete a prompt version or a whole task",
        "Delete version REF (NAME@N), or with --all every version and alias of task REF (NAME).\n"
        "A version that an alias points at is kept unless --force (which removes the alias too).",
        "  softprompt delete sentiment@2\n  softprompt delete sentiment --all\n",
    )
    parser.add_argument("ref", metavar="REF", help="NAME@N, or NAME with --all")
    parser.add_argument(
        "--all", dest="all_versions", action="store_true", help="delete every version of the task"
    )
    parser.add_argument(
        "--force", action="store_true", help="delete even if aliases point at the version"
    )


def _add_alias(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "alias",
        common,
        _cmd_alias,
        "point TASK@ALIAS at a version",
        "Create or move the alias TASK@ALIAS so that it names VERSION.",
        "  softprompt alias sentiment prod 3\n"
        "  softprompt generate sentiment@prod 'Great service'\n",
    )
    parser.add_argument("task", metavar="TASK", help="task name")
    parser.add_argument("alias", metavar="ALIAS", help="alias name, e.g. prod")
    parser.add_argument("version", metavar="VERSION", type=_positive_int, help="version number")


def _add_generate(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "generate",
        common,
        _cmd_generate,
        "generate a completion under a prompt",
        f"Generate a completion of TEXT under prompt REF (NAME, NAME@N or NAME@ALIAS);\n"
        f"REF '{BARE_MODEL_REF}' means the bare base model with no prompt. TEXT '{STDIN_TEXT}' "
        f"reads the input\nfrom stdin. Decoding is greedy unless --temperature > 0. The text goes "
        f"to stdout;\na summary (version used, finish reason, token counts) goes to stderr.",
        "  softprompt generate sentiment@prod 'I loved this film'\n"
        "  softprompt generate - 'Once upon a time' --stream --max-new-tokens 64\n"
        "  softprompt generate summarize - --temperature 0.7 --seed 1 < article.txt\n"
        "  softprompt generate qa 'Who wrote Hamlet?' --chat --stop '.' --stop '?'\n",
    )
    parser.add_argument("ref", metavar="REF", help=f"prompt reference, or '{BARE_MODEL_REF}'")
    parser.add_argument("text", metavar="TEXT", help=f"the input, or '{STDIN_TEXT}' for stdin")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated")
    parser.add_argument(
        "--max-new-tokens", type=_non_negative_int, default=0, metavar="N",
        help="most tokens to generate (default: the server's)",
    )
    parser.add_argument(
        "--temperature", type=_non_negative_float, default=0.0, metavar="T",
        help="sampling temperature (default 0: greedy)",
    )
    parser.add_argument(
        "--top-k", type=_non_negative_int, default=0, metavar="K",
        help="sample among the K most likely tokens (default 0: off)",
    )
    parser.add_argument(
        "--top-p", type=_non_negative_float, default=0.0, metavar="P",
        help="nucleus sampling threshold (default 0: off)",
    )
    parser.add_argument(
        "--seed", type=_non_negative_int, default=None, metavar="N",
        help="make sampling reproducible",
    )
    parser.add_argument(
        "--stop", action="append", default=[], metavar="S",
        help="stop when the text ends with S, which is not returned (repeatable)",
    )
    parser.add_argument(
        "--chat", action="store_true", help="wrap TEXT as a user turn with the chat template"
    )


def _add_classify(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "classify",
        common,
        _cmd_classify,
        "score candidate labels for an input under a prompt",
        f"Score each of --labels as the complete output for INPUT under prompt REF (NAME, NAME@N\n"
        f"or NAME@ALIAS; '{BARE_MODEL_REF}' means the bare base model). INPUT '{STDIN_TEXT}' reads "
        f"stdin. A label's\nlog-probability covers its tokens and the end-of-sequence token; its "
        f"probability is\nnormalized over the labels. Labels are listed most likely first, the best "
        f"marked '*';\na summary (version used, token counts) goes to stderr.",
        "  softprompt classify sentiment@prod 'I loved this film' --labels positive,negative\n"
        "  softprompt classify topic - --labels sports,politics,science < article.txt\n"
        "  softprompt classify sentiment 'Meh.' --labels positive,negative,neutral --chat --json\n",
    )
    parser.add_argument("ref", metavar="REF", help=f"prompt reference, or '{BARE_MODEL_REF}'")
    parser.add_argument("input", metavar="INPUT", help=f"the input, or '{STDIN_TEXT}' for stdin")
    parser.add_argument(
        "--labels",
        type=_labels,
        required=True,
        metavar="A,B,...",
        help="two or more distinct candidate labels, comma-separated (spaces around them are dropped)",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap INPUT as a user turn with the chat template (if the prompt was trained with --chat)",
    )


# TrainingOptions field -> (flag, metavar, help); `softprompt train` has one flag per field, typed
# and defaulted like the field, and TrainingOptions itself checks the values.
_TRAINING_FLAGS: dict[str, tuple[str, str, str]] = {
    "num_virtual_tokens": (
        "--num-virtual-tokens", "N", "virtual tokens of the learned prompt, i.e. rows of its matrix"
    ),
    "init": (
        "--init",
        "SPEC",
        "initial prompt: 'vocab' (embeddings of sampled vocabulary tokens), 'random', "
        "'text:SOME WORDS' (those words' embeddings, repeated) or 'from:TASK[@VERSION]' "
        "(warm start from a registered prompt of the same length)",
    ),
    "learning_rate": ("--lr", "LR", "AdamW learning rate"),
    "epochs": ("--epochs", "N", "passes over the training data"),
    "max_steps": ("--max-steps", "N", "cap on optimizer steps; 0: no cap"),
    "batch_size": ("--batch-size", "N", "examples per forward pass"),
    "grad_accum": (
        "--grad-accum", "N", "forward passes per optimizer step; examples per step: batch size x this"
    ),
    "max_length": (
        "--max-length", "N", "tokens per example, input + target; longer inputs are cut at the end"
    ),
    "seed": ("--seed", "N", "makes initialisation, shuffling and the held-out split reproducible"),
    "eval_fraction": (
        "--eval-fraction", "F", "share of --data held out for evaluation when --eval is not given"
    ),
    "eval_every": (
        "--eval-every", "N", "optimizer steps between held-out evaluations; 0: once per epoch"
    ),
    "patience": (
        "--patience", "N", "evaluations without a better held-out loss before stopping early; 0: never"
    ),
    "apply_chat_template": (
        "--chat", "", "wrap each input as a user turn with the chat template (then run it with --chat)"
    ),
    "warmup_steps": ("--warmup-steps", "N", "optimizer steps of linear learning-rate warm-up"),
}

# `train` flags that only the local trainer (--store) uses, by dest.
_LOCAL_ONLY_FLAGS = {"model": "--model", "device": "--device", "dtype": "--dtype",
                     "output_dir": "--output-dir"}


def _add_train(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "train",
        common,
        _cmd_train,
        "train a soft prompt and register it as a new version",
        "Learn a soft prompt for TASK from examples and register it as TASK's next version.\n"
        "--data (and --eval) are JSONL files with one {\"input\": ..., \"target\": ...} object a "
        "line.\nThe base model stays frozen; only the prompt's virtual tokens are trained. Without "
        "--eval,\n--eval-fraction of --data is held out; held-out loss drives early stopping, and "
        "the\nheld-out metrics before and after training are reported and stored with the version.\n"
        "\n"
        "By default the server trains on its own model (no second copy) and this command watches\n"
        "the job until it ends: progress goes to stderr, the result (held-out metrics before and\n"
        "after, the registered version, the promotion) to stdout, as JSON with --json; the exit\n"
        "status is 0 if the job succeeded. Ctrl-C stops watching, not the job (see `softprompt\n"
        "jobs`). With --store DIR the prompt is trained here, in this process, and registered into\n"
        "the prompt store at DIR (needs the server extras: pip install 'softprompt[server]').\n"
        "\n"
        "--promote ALIAS moves TASK@ALIAS to the new version only if it beats the version the\n"
        "alias points at on the held-out data (accuracy for classification data, else exact\n"
        "match; then loss).",
        "  softprompt train --task sentiment --data train.jsonl --eval dev.jsonl\n"
        "  softprompt train --task sentiment --data train.jsonl --epochs 5 --lr 0.1 --promote prod\n"
        "  softprompt train --task qa --data qa.jsonl --chat --init 'text:Answer the question' "
        "--no-wait\n"
        "  softprompt train --task sentiment --data train.jsonl --store ./prompts --device cuda\n"
        "  softprompt classify sentiment@prod 'Great service' --labels positive,negative\n",
    )
    parser.set_defaults(command_parser=parser)  # for usage errors found after parsing
    data = parser.add_argument_group("data")
    data.add_argument(
        "--task", required=True, metavar="NAME", help="register the prompt as a new version of NAME"
    )
    data.add_argument("--data", required=True, type=Path, metavar="FILE", help="training examples (JSONL)")
    data.add_argument(
        "--eval", type=Path, metavar="FILE", help="held-out examples (JSONL; default: part of --data)"
    )

    defaults = TrainingOptions()
    options = parser.add_argument_group("training options")
    for name, (flag, metavar, help_text) in _TRAINING_FLAGS.items():
        default = getattr(defaults, name)
        if isinstance(default, bool):
            options.add_argument(flag, dest=name, action="store_true", help=help_text)
        else:
            options.add_argument(
                flag, dest=name, type=type(default), default=default, metavar=metavar,
                help=f"{help_text} (default: {default})",
            )

    registration = parser.add_argument_group("registration")
    registration.add_argument("--description", default="", help="free text stored with the version")
    registration.add_argument(
        "--tag", dest="tags", action="append", type=_tag, default=[], metavar="KEY=VALUE",
        help="a label stored with the version (repeatable)",
    )
    registration.add_argument(
        "--promote", default="", metavar="ALIAS",
        help="move TASK@ALIAS to the new version if it beats the alias's current version",
    )

    where = parser.add_argument_group("where to train")
    where.add_argument(
        "--store", type=Path, metavar="DIR",
        help="train locally and register into the prompt store DIR, as `softprompt serve --store` "
        "uses it (default: train on the server)",
    )
    where.add_argument(
        "--no-wait", action="store_true",
        help="on the server: print the job id and return instead of watching the job",
    )
    where.add_argument(
        "--model", metavar="ID",
        help="with --store: Hugging Face model id or local folder (default: as `softprompt serve`)",
    )
    where.add_argument(
        "--device", help="with --store: torch device, e.g. cpu, cuda, cuda:1 (default: as `softprompt serve`)"
    )
    where.add_argument(
        "--dtype", help="with --store: float32, bfloat16 or float16 (default: as `softprompt serve`)"
    )
    where.add_argument(
        "--output-dir", type=Path, metavar="DIR",
        help="with --store: where the loss plot and report go (default: ./runs/TASK-DATE-TIME); "
             "the version's folder in the store holds them too",
    )


def _add_jobs(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "jobs",
        help="list, show, watch or cancel server-side training jobs",
        description="Follow the training jobs that `softprompt train` started on the server. The "
        "server runs\none job at a time and forgets its jobs when it restarts.",
        epilog="examples:\n"
        "  softprompt jobs list\n"
        "  softprompt jobs watch 3f2a9c\n"
        "  softprompt jobs show 3f2a9c --json\n"
        "  softprompt jobs cancel 3f2a9c\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    actions = parser.add_subparsers(dest="jobs_action", metavar="ACTION", required=True)
    _command(
        actions, "list", common, _cmd_jobs_list, "list training jobs, newest first",
        "List the server's training jobs, newest first.",
        "  softprompt jobs list\n  softprompt jobs list --json\n",
    )
    for name, handler, summary, description in (
        ("show", _cmd_jobs_show, "describe a training job",
         "Describe training job ID: state, progress, held-out metrics, registered version."),
        ("watch", _cmd_jobs_watch, "follow a training job until it ends",
         "Show training job ID's progress until it ends, then its result (exit status 0 if it\n"
         "succeeded). Ctrl-C stops watching, not the job. --json prints the job as one JSON\n"
         "line per change."),
        ("cancel", _cmd_jobs_cancel, "stop a queued or running training job",
         "Stop training job ID; nothing is registered."),
    ):
        action = _command(
            actions, name, common, handler, summary, description,
            f"  softprompt jobs {name} 3f2a9c\n",
        )
        action.add_argument("job_id", metavar="ID", help="the job id `softprompt train` printed")


def _add_tokenize(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = _command(
        commands,
        "tokenize",
        common,
        _cmd_tokenize,
        "tokenize text with the base model's tokenizer",
        f"Show the token ids and token strings of TEXT ('{STDIN_TEXT}' reads stdin).",
        "  softprompt tokenize 'Hello world'\n  softprompt tokenize 'Hi' --chat --json\n",
    )
    parser.add_argument("text", metavar="TEXT", help=f"the text, or '{STDIN_TEXT}' for stdin")
    parser.add_argument("--chat", action="store_true", help="apply the chat template first")


def _add_info(commands: Any, common: argparse.ArgumentParser) -> None:
    _command(
        commands,
        "info",
        common,
        _cmd_info,
        "describe the base model and the server's limits",
        "Show the served base model (id, hidden size, fingerprint...) and the request limits.",
        "  softprompt info\n  softprompt --server gpu-box:50051 info --json\n",
    )


# ---------------------------------------------------------------------- argument types


def _tag(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, val


def _labels(value: str) -> list[str]:
    labels = [label.strip() for label in value.split(",")]
    if len(labels) < 2 or "" in labels or len(set(labels)) != len(labels):
        raise argparse.ArgumentTypeError(
            f"expected two or more distinct, non-empty labels separated by commas, got {value!r}"
        )
    return labels


def _number(kind: type, minimum: float, inclusive: bool, what: str) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if number < minimum or (not inclusive and number == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return number

    return parse


_positive_float = _number(float, 0, False, "a positive number")
_non_negative_float = _number(float, 0, True, "a number >= 0")
_non_negative_int = _number(int, 0, True, "an integer >= 0")
_positive_int = _number(int, 1, True, "an integer >= 1")


# ---------------------------------------------------------------------- commands


def _cmd_register(client: Client, args: argparse.Namespace) -> int:
    info = client.register(
        args.task,
        args.path,
        description=args.description,
        tags=dict(args.tags),
        base_model_fingerprint=args.fingerprint,
        force=args.force,
    )
    if _wants_json(args):
        _print_json(info)
    else:
        print(f"registered {info.ref}")
        _print_prompt(info)
    return 0


def _cmd_list(client: Client, args: argparse.Namespace) -> int:
    prompts = client.list_prompts(args.task)
    if _wants_json(args):
        _print_json(prompts)
    elif not prompts:
        print(f"no versions of {args.task}" if args.task else "no prompts registered")
    else:
        _print_table(_PROMPT_COLUMNS, [_prompt_row(p) for p in prompts])
    return 0


def _cmd_show(client: Client, args: argparse.Namespace) -> int:
    info = client.get_prompt(args.ref)
    if _wants_json(args):
        _print_json(info)
    else:
        _print_prompt(info)
    return 0


def _cmd_delete(client: Client, args: argparse.Namespace) -> int:
    deleted = client.delete_prompt(args.ref, all_versions=args.all_versions, force=args.force)
    if _wants_json(args):
        _print_json({"deleted": deleted})
    else:
        for ref in deleted:
            print(f"deleted {ref}")
    return 0


def _cmd_alias(client: Client, args: argparse.Namespace) -> int:
    info = client.set_alias(args.task, args.alias, args.version)
    if _wants_json(args):
        _print_json(info)
    else:
        print(f"{args.task}@{args.alias} -> {info.ref}")
    return 0


def _cmd_generate(client: Client, args: argparse.Namespace) -> int:
    task = "" if args.ref == BARE_MODEL_REF else args.ref
    params = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        chat=args.chat,
    )
    text = _read_text(args.text)
    if args.stream:
        return _stream_generate(client.stream(task, text, **params), _wants_json(args))
    result = client.generate(task, text, **params)
    if _wants_json(args):
        _print_json(result)
    else:
        print(result.text)
        _print_summary(result.prompt_version, result.finish_reason, result.usage)
    return 0


def _stream_generate(chunks: Iterable[StreamChunk], as_json: bool) -> int:
    last: StreamChunk | None = None
    for chunk in chunks:
        if as_json:
            print(json.dumps(dataclasses.asdict(chunk)), flush=True)
        else:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        last = chunk
    if not as_json:
        print()
        if last is not None:
            _print_summary(last.prompt_version, last.finish_reason, last.usage)
    return 0


def _cmd_classify(client: Client, args: argparse.Namespace) -> int:
    task = "" if args.ref == BARE_MODEL_REF else args.ref
    result = client.classify(task, _read_text(args.input), args.labels, chat=args.chat)
    if _wants_json(args):
        _print_json(result)
    else:
        _print_scores(result)
    return 0


def _cmd_train(client: Client, args: argparse.Namespace) -> int:
    options = _training_options(args)
    _check_train_mode(args)
    if args.store is not None:
        return _train_locally(args, options)
    job = client.train(
        args.task,
        args.data,
        args.eval,
        options=options,
        description=args.description,
        tags=dict(args.tags),
        promote_alias=args.promote,
    )
    if args.no_wait:
        if _wants_json(args):
            _print_json(job)
        else:
            print(f"started training job {job.job_id} ({job.state})")
            print(f"follow it with `{_command_line(args)} jobs watch {job.job_id}`")
        return 0
    print(f"started training job {job.job_id}", file=sys.stderr)
    return _follow_job(client, job.job_id, args, json_lines=False)


def _training_options(args: argparse.Namespace) -> TrainingOptions:
    """Builds TrainingOptions from the flags; a value it refuses is a usage error naming the flag."""
    try:
        return TrainingOptions(**{name: getattr(args, name) for name in _TRAINING_FLAGS})
    except ValueError as e:
        message = str(e)
        # TrainingOptions' messages start with the field's name; name the flag the user typed.
        flags = [flag for name, (flag, _, _) in _TRAINING_FLAGS.items() if message.startswith(f"{name} ")]
        _usage_error(args, f"argument {flags[0]}: {message}" if flags else message)


def _check_train_mode(args: argparse.Namespace) -> None:
    if args.store is None:
        local = [flag for dest, flag in _LOCAL_ONLY_FLAGS.items() if getattr(args, dest) is not None]
        if local:
            _usage_error(args, f"{', '.join(local)} only apply to local training (--store DIR)")
    elif args.no_wait:
        _usage_error(args, "--no-wait only applies to training on the server (without --store)")


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """Exits with status 2 after printing the command's usage and `message`, as argparse does."""
    parser: argparse.ArgumentParser = args.command_parser
    parser.error(message)


def _train_locally(args: argparse.Namespace, options: TrainingOptions) -> int:
    try:
        # Imported only here: local training pulls in torch and transformers.
        from softprompt.server.train_local import run_local_training

        return run_local_training(
            task=args.task,
            train_path=args.data,
            eval_path=args.eval,
            options=options,
            store=args.store,
            description=args.description,
            tags=dict(args.tags),
            promote_alias=args.promote,
            output_dir=args.output_dir,
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            json_output=_wants_json(args),
        )
    except ModuleNotFoundError as e:
        return _missing_server_extra(e, "train --store")


def _cmd_jobs_list(client: Client, args: argparse.Namespace) -> int:
    jobs = client.list_training_jobs()
    if _wants_json(args):
        _print_json(jobs)
    elif not jobs:
        print("no training jobs")
    else:
        _print_table(_JOB_COLUMNS, [_job_row(job) for job in jobs])
    return 0


def _cmd_jobs_show(client: Client, args: argparse.Namespace) -> int:
    job = client.get_training_job(args.job_id)
    if _wants_json(args):
        _print_json(job)
    else:
        _print_job(job)
    return 0


def _cmd_jobs_watch(client: Client, args: argparse.Namespace) -> int:
    return _follow_job(client, args.job_id, args, json_lines=_wants_json(args))


def _cmd_jobs_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel_training_job(args.job_id)
    if _wants_json(args):
        _print_json(job)
    else:
        print(f"training job {job.job_id}: {job.state}")
    return 0


def _follow_job(client: Client, job_id: str, args: argparse.Namespace, *, json_lines: bool) -> int:
    """Watches a job until it ends, then prints it; 0 if it succeeded, 1 otherwise, 130 on Ctrl-C.

    Progress goes to stderr and the final job to stdout (as JSON with --json); with `json_lines`,
    every change of the job goes to stdout as one JSON line instead.
    """
    try:
        if json_lines:
            job = _watch_to_end(client, job_id, _print_json_line)
        else:
            with _ProgressLine(sys.stderr) as progress:
                job = _watch_to_end(client, job_id, progress.update)
    except KeyboardInterrupt:
        command = _command_line(args)
        print(
            f"stopped watching; training job {job_id} goes on on the server.\n"
            f"follow it with `{command} jobs watch {job_id}`, "
            f"stop it with `{command} jobs cancel {job_id}`",
            file=sys.stderr,
        )
        return 130
    if _wants_json(args) and not json_lines:
        _print_json(job)
    elif not json_lines:  # with JSON lines, the final job was the last line
        _print_job(job)
    if job.state == "succeeded":
        return 0
    print(
        f"error: training job {job_id} {job.state or 'ended'}" + (f": {job.error}" if job.error else ""),
        file=sys.stderr,
    )
    return 1


def _watch_to_end(client: Client, job_id: str, show: Callable[[TrainingJob], None]) -> TrainingJob:
    """Calls `show` with the job each time it changes until it ends; returns the final job."""
    job = None
    # No deadline: --timeout bounds each call, and a watch lasts as long as the job.
    for job in client.watch_training_job(job_id):
        show(job)
    if job is None or not job.done:  # the watch began just as the job ended: ask for its state
        job = client.get_training_job(job_id)
        show(job)
    return job


def _command_line(args: argparse.Namespace) -> str:
    """`softprompt`, plus --server if one was given, to suggest follow-up commands."""
    server = _option(args, "server", None)
    return f"softprompt --server {server}" if server else "softprompt"


def _cmd_tokenize(client: Client, args: argparse.Namespace) -> int:
    result = client.tokenize(_read_text(args.text), chat=args.chat)
    if _wants_json(args):
        _print_json(result)
        return 0
    print(f"{len(result.token_ids)} tokens")
    _print_table(("ID", "TOKEN"), [(str(i), repr(t)) for i, t in zip(result.token_ids, result.tokens)])
    return 0


def _cmd_info(client: Client, args: argparse.Namespace) -> int:
    info = client.model_info()
    if _wants_json(args):
        _print_json(info)
    else:
        _print_fields(_model_fields(info))
    return 0


# ---------------------------------------------------------------------- output


def _wants_json(args: argparse.Namespace) -> bool:
    return bool(_option(args, "json", False))


def _read_text(text: str) -> str:
    return sys.stdin.read() if text == STDIN_TEXT else text


def _print_json(value: Any) -> None:
    print(json.dumps(_jsonable(value), indent=2, ensure_ascii=False))


def _print_json_line(value: Any) -> None:
    print(json.dumps(_jsonable(value), ensure_ascii=False), flush=True)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _print_summary(prompt_version: str, finish_reason: str | None, usage: Usage | None) -> None:
    # Metadata goes to stderr so that stdout holds exactly the generated text (pipe-friendly).
    parts = [prompt_version or "base model", f"finish: {finish_reason or 'unknown'}"]
    if usage is not None:
        parts.append(
            f"tokens: {usage.input_tokens} input + {usage.virtual_tokens} virtual, "
            f"{usage.generated_tokens} generated"
        )
    print(f"[{'; '.join(parts)}]", file=sys.stderr)


_PROMPT_COLUMNS = ("REF", "TYPE", "TOKENS", "HIDDEN", "ALIASES", "CREATED", "DESCRIPTION")


def _prompt_row(p: PromptInfo) -> tuple[str, ...]:
    return (
        p.ref,
        p.peft_type,
        str(p.num_virtual_tokens),
        str(p.hidden_size),
        ",".join(p.aliases) or "-",
        p.created_at,
        p.description,
    )


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    for row in (headers, *rows):
        cells = [str(c).ljust(w) for c, w in zip(row, widths)]
        print("  ".join(cells).rstrip())


def _print_fields(fields: Sequence[tuple[str, Any]]) -> None:
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name.ljust(width)}  {value}")


def _print_prompt(p: PromptInfo) -> None:
    _print_fields(
        [
            ("ref", p.ref),
            ("type", p.peft_type),
            ("virtual tokens", p.num_virtual_tokens),
            ("hidden size", p.hidden_size),
            ("aliases", ", ".join(p.aliases) or "-"),
            ("created", p.created_at),
            ("description", p.description or "-"),
            ("tags", ", ".join(f"{k}={v}" for k, v in sorted(p.tags.items())) or "-"),
            ("base model", p.base_model_fingerprint or "-"),
            ("sha256", p.sha256),
            *([("metrics", _metrics_text(p.metrics))] if p.metrics else []),
        ]
    )


def _metrics_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in sorted(metrics.items()))


def _print_scores(result: ClassifyResult) -> None:
    ranked = sorted(result.scores, key=lambda s: s.probability, reverse=True)
    rows = [
        ("*" if s.label == result.label else "", s.label, f"{s.probability:.4f}", f"{s.logprob:.4f}",
         str(s.num_tokens))
        for s in ranked
    ]
    _print_table(("", "LABEL", "PROBABILITY", "LOGPROB", "TOKENS"), rows)
    print(
        f"[{result.prompt_version or 'base model'}; tokens: {result.input_tokens} input + "
        f"{result.virtual_tokens} virtual]",
        file=sys.stderr,
    )


_JOB_COLUMNS = ("JOB", "TASK", "STATE", "STEP", "EVAL LOSS", "VERSION", "CREATED")


def _job_row(job: TrainingJob) -> tuple[str, ...]:
    p = job.progress
    return (
        job.job_id,
        job.task,
        job.state,
        f"{p.step}/{p.total_steps}",
        "-" if p.eval_loss is None else f"{p.eval_loss:.4f}",
        job.version.ref if job.version else "-",
        job.created_at,
    )


def _print_job(job: TrainingJob) -> None:
    p = job.progress
    fields: list[tuple[str, Any]] = [
        ("job", job.job_id),
        ("task", job.task),
        ("state", job.state if job.done or not job.phase else f"{job.state} ({job.phase})"),
        ("created", job.created_at),
        ("finished", job.finished_at or "-"),
        ("examples", f"{job.train_examples} training, {job.eval_examples} held-out"),
        ("progress", f"step {p.step}/{p.total_steps}, epoch {p.epoch:.2f}, "
                     f"{_duration(p.elapsed_seconds)}"),
        ("train loss", f"{p.train_loss:.4f}"),
        ("eval loss", "-" if p.eval_loss is None else
                      f"{p.eval_loss:.4f} (best {p.best_eval_loss:.4f})"),
        ("version", job.version.ref if job.version else "-"),
    ]
    if job.promoted or job.promotion:
        fields.append(("promotion", f"{'promoted' if job.promoted else 'not promoted'}: {job.promotion}"))
    if job.error:
        fields.append(("error", job.error))
    _print_fields(fields)
    measured = [(name, m) for name, m in (("before", job.before), ("after", job.after)) if m]
    if measured:
        print()
        _print_table(_METRIC_COLUMNS, [_metrics_row(name, m) for name, m in measured])


_METRIC_COLUMNS = ("HELD-OUT", "EXAMPLES", "LOSS", "EXACT MATCH", "ACCURACY")


def _metrics_row(name: str, m: EvalMetrics) -> tuple[str, ...]:
    accuracy = "-" if m.accuracy is None else f"{m.accuracy:.4f}"
    return (name, str(m.examples), f"{m.loss:.4f}", f"{m.exact_match:.4f}", accuracy)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _progress_text(job: TrainingJob) -> str:
    p = job.progress
    parts = [job.phase or job.state]
    if p.total_steps:
        parts.append(f"step {p.step}/{p.total_steps}")
    if p.step:
        parts.append(f"loss {p.train_loss:.4f}")
    if p.eval_loss is not None:
        parts.append(f"eval loss {p.eval_loss:.4f}")
    if p.steps_per_second:
        parts.append(f"{p.steps_per_second:.2f} steps/s")
    if p.elapsed_seconds:
        parts.append(_duration(p.elapsed_seconds))
    return "  ".join(parts)


# Without a terminal, a progress line is printed at most this often (seconds), or on a phase change.
_PROGRESS_INTERVAL = 2.0


class _ProgressLine:
    """Shows a training job's progress: one line rewritten in place on a terminal, else plain lines.

    Use it as a context manager: leaving it ends the terminal line, so that what follows (a result,
    an error, the Ctrl-C notice) starts on a fresh one.
    """

    def __init__(
        self,
        stream: TextIO,
        interval: float = _PROGRESS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._interval = interval
        self._clock = clock
        self._width = 0  # length of the line on screen (terminal only)
        self._last: tuple[str, str, float] | None = None  # (stage, text, time) printed last

    def update(self, job: TrainingJob) -> None:
        """Shows `job`'s progress (throttled unless on a terminal or the phase changed)."""
        text = _progress_text(job)
        if self._tty:
            # Pad to the previous line's length so that no characters of it remain.
            self._stream.write("\r" + text.ljust(self._width))
            self._stream.flush()
            self._width = len(text)
            return
        stage, now = f"{job.state}/{job.phase}", self._clock()
        if self._last is not None:
            last_stage, last_text, last_time = self._last
            if text == last_text or (stage == last_stage and now - last_time < self._interval):
                return
        print(text, file=self._stream, flush=True)
        self._last = (stage, text, now)

    def __enter__(self) -> _ProgressLine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._tty and self._width:
            self._stream.write("\n")
            self._stream.flush()


def _model_fields(m: ModelInfo) -> list[tuple[str, Any]]:
    limits = m.limits
    return [
        ("model", m.model_id),
        ("fingerprint", m.fingerprint),
        ("hidden size", m.hidden_size),
        ("dtype", m.dtype),
        ("device", m.device),
        ("max sequence length", m.max_sequence_length),
        ("vocab size", m.vocab_size),
        ("chat template", "yes" if m.has_chat_template else "no"),
        ("max new tokens", f"{limits.max_new_tokens} (default {limits.default_max_new_tokens})"),
        ("max input tokens", limits.max_input_tokens),
        ("max virtual tokens", limits.max_virtual_tokens),
        ("max batch size", limits.max_batch_size),
        ("max queued requests", limits.max_queued_requests),
        ("max upload bytes", limits.max_upload_bytes),
    ]


if __name__ == "__main__":
    sys.exit(main())
