"""The `serve`, `bench` and `token` entries of the top-level parser: documentation only.

`app.main` hands these commands' argv to their server-side parsers (through `handoff`) before
argparse runs, so that every flag, --help included, reaches them untouched. The entries here list
them in `softprompt --help`, and catch the rare command line the pre-scan leaves to argparse (an
abbreviated global option before the command).
"""

from __future__ import annotations

import argparse
from typing import Any

from softprompt.client.cli import handoff
from softprompt.client.client import Client

_SUMMARIES = {
    "serve": "start the server: gRPC, and OpenAI's HTTP API on :8000 (see `softprompt serve --help`)",
    "bench": "measure our engine and server against HF generate and PEFT (see `softprompt bench --help`)",
    "token": "make bearer tokens for `serve --auth-tokens` (see `softprompt token --help`)",
}


def add_parsers(commands: Any) -> None:
    """Adds `serve`, `bench` and `token` to the subparsers `commands`."""
    for name, summary in _SUMMARIES.items():
        parser = commands.add_parser(name, help=summary, add_help=False)
        parser.add_argument("server_argv", nargs=argparse.REMAINDER)
        parser.set_defaults(handler=_run_server_side, server_command=name)


def _run_server_side(client: Client, args: argparse.Namespace) -> int:
    return handoff.run_command(args.server_command, args.server_argv)
