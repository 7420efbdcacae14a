"""The commands that manage registered prompts: `register`, `list`, `show`, `delete`, `alias` and `export`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from softprompt.client.cli import render
from softprompt.client.cli.parsing import add_command, command_line, positive_int, tag, wants_json
from softprompt.client.client import Client
from softprompt.client.types import PromptInfo

MAX_PAGE = 1000  # the most versions a server returns per ListPrompts call


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    """Adds `register`, `list`, `show`, `delete`, `alias` and `export` to the subparsers `commands`."""
    _add_register(commands, common)
    _add_list(commands, common)
    _add_show(commands, common)
    _add_delete(commands, common)
    _add_alias(commands, common)
    _add_export(commands, common)


def _add_register(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(
        commands,
        "register",
        common,
        _cmd_register,
        "register a new version of a task's prompt",
        "Upload a soft prompt as the next version of TASK. PATH is either a PEFT adapter\n"
        "directory (save_pretrained output: adapter_config.json + adapter_model.safetensors,\n"
        "plus an optional softprompt.json recording base_model_fingerprint) or a .safetensors\n"
        "file holding a single [num_virtual_tokens, hidden_size] tensor (F32, F16 or BF16).\n"
        "Any PEFT prompt-learning adapter: PROMPT_TUNING, P_TUNING, PREFIX_TUNING, CARTRIDGE,\n"
        "MULTITASK_PROMPT_TUNING (one task: --task-id) or CPT.\n"
        "Registration is refused if the prompt was made for another base model, unless --force.",
        "  softprompt register sentiment ./sentiment-adapter\n"
        "  softprompt register sentiment ./multitask-adapter --task-id 2\n"
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
        type=tag,
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
    parser.add_argument(
        "--task-id", type=int, default=None, metavar="N",
        help="a MULTITASK_PROMPT_TUNING adapter's task to register (0 .. num_tasks - 1)",
    )


def _add_list(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(
        commands,
        "list",
        common,
        _cmd_list,
        "list registered prompt versions",
        "List every version of TASK, or of all tasks (tasks by name, newest version first). Versions\n"
        "are fetched a page at a time and printed as each page arrives, so a registry of 100,000\n"
        "tasks starts printing at once; --limit stops after N and prints the command for the rest.",
        "  softprompt list\n  softprompt list sentiment\n  softprompt list --json\n"
        "  softprompt list --limit 50                 # then: softprompt list --limit 50 --page-token ...\n",
    )
    parser.add_argument("task", metavar="TASK", nargs="?", help="only this task's versions")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="list at most N versions, then print how to list the next ones")
    parser.add_argument("--page-token", default="", metavar="TOKEN",
                        help="continue a listing where --limit stopped (the token it printed)")
    parser.add_argument("--page-size", type=positive_int, default=None, metavar="N",
                        help=f"versions fetched per call (default: the server's, 100; at most {MAX_PAGE})")


def _add_show(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(
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
    parser = add_command(
        commands,
        "delete",
        common,
        _cmd_delete,
        "delete a prompt version or a whole task",
        "Delete version REF (NAME@N), or with --all every version and alias of task REF (NAME).\n"
        "A version that an alias points at is kept unless --force (which removes the alias too);\n"
        "also for --all: a task with aliases is kept unless --force.",
        "  softprompt delete sentiment@2\n  softprompt delete sentiment --all\n"
        "  softprompt delete sentiment --all --force   # its aliases (sentiment@prod, ...) go too\n",
    )
    parser.add_argument("ref", metavar="REF", help="NAME@N, or NAME with --all")
    parser.add_argument(
        "--all", dest="all_versions", action="store_true", help="delete every version of the task"
    )
    parser.add_argument(
        "--force", action="store_true", help="delete even if aliases point at the version (or, with --all, into "
        "the task); they are removed too"
    )


def _add_alias(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(
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
    parser.add_argument("version", metavar="VERSION", type=positive_int, help="version number")


def _add_export(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(
        commands,
        "export",
        common,
        _cmd_export,
        "write a version's files into a folder",
        "Fetch every file of the version REF resolves to (NAME, NAME@N or NAME@ALIAS) from the server\n"
        "into DIR (created if missing): the PEFT adapter (adapter_config.json, adapter_model.safetensors;\n"
        "PeftModel.from_pretrained(base_model, DIR) loads it), softprompt.json, and for a version a\n"
        "training run registered, its report (training.json) and loss plot (loss.png). Files of the\n"
        "same names in DIR are replaced.",
        "  softprompt export sentiment@2 ./sentiment-v2\n"
        "  softprompt export sentiment@prod ./deployed && open ./deployed/loss.png\n",
    )
    parser.add_argument("ref", metavar="REF", help="NAME, NAME@N or NAME@ALIAS")
    parser.add_argument("directory", metavar="DIR", type=Path, help="folder to write the files into")


def _cmd_register(client: Client, args: argparse.Namespace) -> int:
    info = client.register(
        args.task,
        args.path,
        description=args.description,
        tags=dict(args.tags),
        base_model_fingerprint=args.fingerprint,
        force=args.force,
        task_id=args.task_id,
    )
    if wants_json(args):
        render.print_json(info)
    else:
        print(f"registered {info.ref}")
        render.print_prompt(info)
    return 0


def _cmd_list(client: Client, args: argparse.Namespace) -> int:
    listed: list[PromptInfo] = []
    widths: list[int] | None = None  # the table's columns, sized by the first page
    token, left = args.page_token, args.limit
    while True:
        # 0 asks for the server's default page; --limit asks for no more than it prints.
        sizes = [s for s in (left, args.page_size) if s]
        page, token = client.list_prompts_page(args.task, min([*sizes, MAX_PAGE]) if sizes else 0, token)
        if wants_json(args):
            listed += page
        elif page:
            rows = [render.prompt_row(p) for p in page]
            if widths is None:
                widths = render.column_widths(render.PROMPT_COLUMNS, rows)
                render.print_rows(widths, [render.PROMPT_COLUMNS])
            render.print_rows(widths, rows)
        if left is not None:
            left -= len(page)
        if not token or (left is not None and left <= 0):
            break
    if wants_json(args):
        render.print_json(listed)
    elif widths is None:
        more = "no more versions" if args.page_token else "no prompts registered"
        print(f"no versions of {args.task}" if args.task and not args.page_token else more)
    if token:
        task = f" {args.task}" if args.task else ""
        print(f"more versions: {command_line(args)} list{task} --limit {args.limit} --page-token {token}",
              file=sys.stderr)
    return 0


def _cmd_show(client: Client, args: argparse.Namespace) -> int:
    info = client.get_prompt(args.ref)
    if wants_json(args):
        render.print_json(info)
    else:
        render.print_prompt(info)
    return 0


def _cmd_delete(client: Client, args: argparse.Namespace) -> int:
    deleted = client.delete_prompt(args.ref, all_versions=args.all_versions, force=args.force)
    if wants_json(args):
        render.print_json({"deleted": deleted})
    else:
        for ref in deleted:
            print(f"deleted {ref}")
    return 0


def _cmd_export(client: Client, args: argparse.Namespace) -> int:
    exported = client.export_prompt(args.ref, args.directory)
    if wants_json(args):
        render.print_json({"ref": exported.prompt.ref, "directory": str(exported.directory),
                           "files": list(exported.files)})
    else:
        print(f"exported {exported.prompt.ref} to {exported.directory}: {', '.join(exported.files)}")
    return 0


def _cmd_alias(client: Client, args: argparse.Namespace) -> int:
    info = client.set_alias(args.task, args.alias, args.version)
    if wants_json(args):
        render.print_json(info)
    else:
        print(f"{args.task}@{args.alias} -> {info.ref}")
    return 0
