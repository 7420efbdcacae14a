"""The `softprompt` command: start the server, manage prompts, and generate from the shell.

Every command except `serve` and `bench` talks to a running server through `softprompt.client.Client`
and imports only the standard library, grpcio and protobuf, so it starts fast and installs light.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from softprompt.client.client import DEFAULT_TARGET, Client
from softprompt.client.errors import SoftpromptError
from softprompt.client.types import ModelInfo, PromptInfo, StreamChunk, Usage

__all__ = ["main", "build_parser"]

SERVER_ENV = "SOFTPROMPT_SERVER"
BARE_MODEL_REF = "-"
STDIN_TEXT = "-"

Handler = Callable[[Client, argparse.Namespace], int]

# Top-level modules of the `server` extra (pyproject.toml) that a client-only install lacks.
_SERVER_EXTRAS = frozenset(
    {"torch", "numpy", "transformers", "peft", "safetensors", "gguf", "accelerate", "tqdm",
     "grpc_health", "grpc_reflection"}
)

# Global options that take a value; the `serve`/`bench` pre-scan must skip their values.
_VALUED_GLOBALS = ("--server", "--timeout")
# Commands that run server-side code with their own parser; main() hands them their argv untouched.
_HANDED_OFF = ("serve", "bench")

_MAIN_DESCRIPTION = """\
Run one frozen base language model with many soft prompts (prompt-tuning adapters).

Start a server with `softprompt serve`, register prompts (PEFT adapters or raw tensors) under
task names, then generate with them. Prompts are referenced as NAME (newest version), NAME@3
(a version) or NAME@ALIAS (e.g. NAME@prod)."""

_MAIN_EPILOG = f"""\
examples:
  softprompt serve --help
  softprompt register sentiment ./sentiment-adapter --tag lang=en
  softprompt alias sentiment prod 1
  softprompt generate sentiment@prod "I loved this film"
  softprompt list --json

The server address comes from --server, else ${SERVER_ENV}, else {DEFAULT_TARGET}.
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
        with Client(server, timeout=_option(args, "timeout", None)) as client:
            handler: Handler = args.handler
            return handler(client, args)
    except SoftpromptError as e:
        _print_server_error(e, server)
    except (OSError, ValueError) as e:  # local input: a missing or malformed prompt file
        if isinstance(e, BrokenPipeError):
            return _quiet_broken_pipe()
        print(f"error: {e}", file=sys.stderr)
    return 1


def _option(args: argparse.Namespace, name: str, default: Any) -> Any:
    # Global options may appear before or after the command, so both parsers leave them unset
    # (SUPPRESS) unless given; the default is applied here, once.
    return getattr(args, name, default)


def _print_server_error(e: SoftpromptError, server: str) -> None:
    print(f"error: {e.code.name}: {e.details}", file=sys.stderr)
    if e.code == grpc.StatusCode.UNAVAILABLE:
        print(
            f"is the server running at {server}? start it with `softprompt serve` "
            f"(or point --server / ${SERVER_ENV} at it)",
            file=sys.stderr,
        )
    elif e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        print("the call ran out of time; raise --timeout or omit it", file=sys.stderr)


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
        elif token == "--json" or token.startswith(tuple(f"{g}=" for g in _VALUED_GLOBALS)):
            i += 1
        else:
            return (token, argv[i + 1 :]) if token in _HANDED_OFF else None
    return None


def _server_side(command: str, argv: list[str]) -> int:
    try:
        # Imported only here: the server pulls in torch and transformers.
        if command == "bench":
            from softprompt.server.bench import main as command_main
        else:
            from softprompt.server.cli import main as command_main

        status = command_main(argv)
    except ModuleNotFoundError as e:
        # Only a missing optional dependency gets advice; any other import failure is a bug
        # whose traceback should stay visible.
        if (e.name or "").split(".")[0] not in _SERVER_EXTRAS:
            raise
        print(
            f"error: cannot run `softprompt {command}` ({e}); install the server extras: "
            "pip install 'softprompt[server]'",
            file=sys.stderr,
        )
        return 1
    return status if isinstance(status, int) else 0


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
    _add_register(commands, common)
    _add_list(commands, common)
    _add_show(commands, common)
    _add_delete(commands, common)
    _add_alias(commands, common)
    _add_generate(commands, common)
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
        help="deadline of each server call (default: none)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print machine-readable JSON instead of text",
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
        ]
    )


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
