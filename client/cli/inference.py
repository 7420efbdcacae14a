"""The commands that run the base model: `generate`, `classify`, `tokenize`, `info` and `top`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterable
from typing import Any

from softprompt.client.cli import render
from softprompt.client.cli.parsing import (
    add_command,
    labels,
    non_negative_float,
    non_negative_int,
    wants_json,
)
from softprompt.client.client import Client
from softprompt.client.types import StreamChunk
from softprompt.prompts.options import DecodingOptions

BARE_MODEL_REF = "-"
STDIN_TEXT = "-"


def add_generate(commands: Any, common: argparse.ArgumentParser) -> None:
    """Adds `generate` to the subparsers `commands`; each decoding flag's dest is a `DecodingOptions` field."""
    parser = add_command(
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
        "--max-new-tokens", type=non_negative_int, default=0, metavar="N",
        help="most tokens to generate (default: the server's)",
    )
    parser.add_argument(
        "--temperature", type=non_negative_float, default=0.0, metavar="T",
        help="sampling temperature (default 0: greedy)",
    )
    parser.add_argument(
        "--top-k", type=non_negative_int, default=0, metavar="K",
        help="sample among the K most likely tokens (default 0: off)",
    )
    parser.add_argument(
        "--top-p", type=non_negative_float, default=0.0, metavar="P",
        help="nucleus sampling threshold (default 0: off)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=None, metavar="N",
        help="make sampling reproducible",
    )
    parser.add_argument(
        "--stop", action="append", default=[], metavar="S",
        help="stop when the text ends with S, which is not returned (repeatable)",
    )
    parser.add_argument(
        "--chat", action="store_true", help="wrap TEXT as a user turn with the chat template"
    )
    parser.add_argument(
        "--priority", type=int, default=None, metavar="N",
        help="how soon it is served: lower first, as vLLM's (default: the task's on the server, usually 0); "
             "the token's role bounds how low it may go",
    )


def add_classify(commands: Any, common: argparse.ArgumentParser) -> None:
    """Adds `classify` to the subparsers `commands`."""
    parser = add_command(
        commands,
        "classify",
        common,
        _cmd_classify,
        "score candidate labels for an input under a prompt",
        f"Score each of --labels as the complete output for INPUT under prompt REF (NAME, NAME@N\n"
        f"or NAME@ALIAS; '{BARE_MODEL_REF}' means the bare base model). INPUT '{STDIN_TEXT}' reads "
        f"stdin. A label's\nlog-probability covers its tokens and the end-of-sequence token (with --chat, "
        f"the template's\nend of turn); its probability is normalized over the labels. Labels are listed most\n"
        f"likely first, the best marked '*'; a summary (version used, token counts) goes to stderr.",
        "  softprompt classify sentiment@prod 'I loved this film' --labels positive,negative\n"
        "  softprompt classify topic - --labels sports,politics,science < article.txt\n"
        "  softprompt classify sentiment 'Meh.' --labels positive,negative,neutral --chat --json\n",
    )
    parser.add_argument("ref", metavar="REF", help=f"prompt reference, or '{BARE_MODEL_REF}'")
    parser.add_argument("input", metavar="INPUT", help=f"the input, or '{STDIN_TEXT}' for stdin")
    parser.add_argument(
        "--labels",
        type=labels,
        required=True,
        metavar="A,B,...",
        help="two or more distinct candidate labels, comma-separated (spaces around them are dropped)",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap INPUT as a user turn with the chat template (if the prompt was trained with --chat)",
    )


def add_tokenize(commands: Any, common: argparse.ArgumentParser) -> None:
    """Adds `tokenize` to the subparsers `commands`."""
    parser = add_command(
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


def add_info(commands: Any, common: argparse.ArgumentParser) -> None:
    """Adds `info` to the subparsers `commands`."""
    add_command(
        commands,
        "info",
        common,
        _cmd_info,
        "describe the base model and the server's limits",
        "Show the served base model (id, hidden size, fingerprint...) and the request limits.",
        "  softprompt info\n  softprompt --server gpu-box:50051 info --json\n",
    )


def add_top(commands: Any, common: argparse.ArgumentParser) -> None:
    """Adds `top` to the subparsers `commands`."""
    parser = add_command(
        commands,
        "top",
        common,
        _cmd_top,
        "show how the server is shared between tasks, refreshed",
        "Show each task busy now or lately: rows it holds in the batch, requests queued, its share of the\n"
        "rows against the fair share its weight entitles it to, its weight and default priority (the\n"
        "server's --task-policy), tokens computed for it per second, and requests refused by its limits.\n"
        "Refreshes every --interval seconds until Ctrl-C (--count N: N times; --json: one object a line).",
        "  softprompt top\n  softprompt top --count 1\n  softprompt --server gpu-box:50051 top --interval 5\n",
    )
    parser.add_argument("--interval", type=non_negative_float, default=2.0, metavar="SECONDS",
                        help="seconds between refreshes (default 2)")
    parser.add_argument("--count", type=non_negative_int, default=0, metavar="N",
                        help="refresh N times, then exit (default 0: until Ctrl-C)")


def _read_text(text: str) -> str:
    return sys.stdin.read() if text == STDIN_TEXT else text


def _task(ref: str) -> str:
    # The wire names the bare base model with an empty task.
    return "" if ref == BARE_MODEL_REF else ref


def _decoding_options(args: argparse.Namespace) -> DecodingOptions:
    """The generate command's decoding flags: one a `DecodingOptions` field, its dest the field's name."""
    return DecodingOptions(**{field.name: getattr(args, field.name) for field in dataclasses.fields(DecodingOptions)})


def _cmd_generate(client: Client, args: argparse.Namespace) -> int:
    options, task, text = _decoding_options(args), _task(args.ref), _read_text(args.text)
    if args.stream:
        return _stream_generate(client.stream(task, text, options=options, priority=args.priority),
                                wants_json(args))
    result = client.generate(task, text, options=options, priority=args.priority)
    if wants_json(args):
        render.print_json(result)
    else:
        print(result.text)
        render.print_summary(result.prompt_version, result.finish_reason, result.usage)
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
            render.print_summary(last.prompt_version, last.finish_reason, last.usage)
    return 0


def _cmd_classify(client: Client, args: argparse.Namespace) -> int:
    result = client.classify(_task(args.ref), _read_text(args.input), args.labels, chat=args.chat)
    if wants_json(args):
        render.print_json(result)
    else:
        render.print_scores(result)
    return 0


def _cmd_tokenize(client: Client, args: argparse.Namespace) -> int:
    result = client.tokenize(_read_text(args.text), chat=args.chat)
    if wants_json(args):
        render.print_json(result)
        return 0
    print(f"{len(result.token_ids)} tokens")
    render.print_table(("ID", "TOKEN"), [(str(i), repr(t)) for i, t in zip(result.token_ids, result.tokens)])
    return 0


def _cmd_info(client: Client, args: argparse.Namespace) -> int:
    info = client.model_info()
    if wants_json(args):
        render.print_json(info)
    else:
        render.print_model(info)
        if info.tasks:
            print()
            render.print_tasks(info.tasks)
    return 0


def _cmd_top(client: Client, args: argparse.Namespace) -> int:
    shown = 0
    try:
        while True:
            info = client.model_info()
            if wants_json(args):
                render.print_json_line({"tasks": [dataclasses.asdict(t) for t in info.tasks]})
            else:
                if sys.stdout.isatty():
                    print("\033[H\033[2J", end="")  # a terminal shows one table at a time, as top does
                kv = "" if info.kv_cache is None else f"; kv cache {render.kv_cache_line(info.kv_cache)}"
                print(f"{info.model_id}: max batch {info.limits.max_batch_size}{kv}")
                render.print_tasks(info.tasks)
            sys.stdout.flush()
            shown += 1
            if args.count and shown >= args.count:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
