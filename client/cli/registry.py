"""The commands that manage registered prompts: `register`, `list`, `show`, `delete` and `alias`."""

from __future__ import annotations

import argparse
from typing import Any

from softprompt.client.cli import render
from softprompt.client.cli.parsing import add_command, positive_int, tag, wants_json
from softprompt.client.client import Client


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    """Adds `register`, `list`, `show`, `delete` and `alias` to the subparsers `commands`."""
    _add_register(commands, common)
    _add_list(commands, common)
    _add_show(commands, common)
    _add_delete(commands, common)
    _add_alias(commands, common)


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


def _add_list(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = add_command(
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


def _cmd_register(client: Client, args: argparse.Namespace) -> int:
    info = client.register(
        args.task,
        args.path,
        description=args.description,
        tags=dict(args.tags),
        base_model_fingerprint=args.fingerprint,
        force=args.force,
    )
    if wants_json(args):
        render.print_json(info)
    else:
        print(f"registered {info.ref}")
        render.print_prompt(info)
    return 0


def _cmd_list(client: Client, args: argparse.Namespace) -> int:
    prompts = client.list_prompts(args.task)
    if wants_json(args):
        render.print_json(prompts)
    elif not prompts:
        print(f"no versions of {args.task}" if args.task else "no prompts registered")
    else:
        render.print_table(render.PROMPT_COLUMNS, [render.prompt_row(p) for p in prompts])
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


def _cmd_alias(client: Client, args: argparse.Namespace) -> int:
    info = client.set_alias(args.task, args.alias, args.version)
    if wants_json(args):
        render.print_json(info)
    else:
        print(f"{args.task}@{args.alias} -> {info.ref}")
    return 0
