"""What every command module shares to declare its arguments and read them back.

`add_command` builds one command's parser (help, description, examples, the global options); the
argument types turn bad values into argparse usage errors; `option`, `wants_json` and
`command_line` read the global options, which stay unset unless given.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from softprompt.client.client import Client

# What a command runs once its arguments are parsed; returns the exit status.
Handler = Callable[[Client, argparse.Namespace], int]


def add_command(
    commands: Any,
    name: str,
    common: argparse.ArgumentParser,
    handler: Handler,
    summary: str,
    description: str,
    examples: str,
) -> argparse.ArgumentParser:
    """Adds command `name` to the subparsers `commands`, with the global options `common`."""
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


def option(args: argparse.Namespace, name: str, default: Any) -> Any:
    """The global option `name`, or `default` if it was not given."""
    # Global options may appear before or after the command, so both parsers leave them unset
    # (SUPPRESS) unless given; the default is applied here, once.
    return getattr(args, name, default)


def wants_json(args: argparse.Namespace) -> bool:
    """Whether --json was given."""
    return bool(option(args, "json", False))


def command_line(args: argparse.Namespace) -> str:
    """`softprompt`, plus --server if one was given, to suggest follow-up commands."""
    server = option(args, "server", None)
    return f"softprompt --server {server}" if server else "softprompt"


# ---------------------------------------------------------------------- argument types


def tag(value: str) -> tuple[str, str]:
    """Parses a KEY=VALUE label (--tag)."""
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, val


def labels(value: str) -> list[str]:
    """Parses two or more distinct, comma-separated labels (--labels)."""
    parts = [label.strip() for label in value.split(",")]
    if len(parts) < 2 or "" in parts or len(set(parts)) != len(parts):
        raise argparse.ArgumentTypeError(
            f"expected two or more distinct, non-empty labels separated by commas, got {value!r}"
        )
    return parts


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


positive_float = _number(float, 0, False, "a positive number")
non_negative_float = _number(float, 0, True, "a number >= 0")
non_negative_int = _number(int, 0, True, "an integer >= 0")
positive_int = _number(int, 1, True, "an integer >= 1")
