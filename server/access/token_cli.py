"""`softprompt token`: make bearer tokens and the hashed lines of the `--auth-tokens` file."""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from softprompt.server.access.tokens import Role, format_entry, hash_token

# 32 random bytes: far beyond guessing, and their unsalted SHA-256 is safe to store.
_TOKEN_BYTES = 32
# Below this a stored hash could be reversed by trying every short string.
_SHORT_TOKEN = 16

EPILOG = """\
token file format (one token a line, `#` starts a comment):
  sha256:<hex digest of the token>  ROLE  [TASK_PATTERN ...]

roles:
  infer   Inference (Generate, GenerateStream, Classify, Tokenize, ModelInfo), GetPrompt, ListPrompts
  admin   everything: also RegisterPrompt, DeletePrompt, SetAlias and every Training RPC

task patterns are globs over task names (`sentiment`, `team-a-*`); none means every task, and `-`
is the bare base model. A limited token's ListPrompts and ListTrainingJobs show only its tasks.

examples:
  softprompt token new admin --append tokens.txt        # prints the token; the file gets its hash
  softprompt token new infer 'sentiment*' - --append tokens.txt
  softprompt token hash < my-token.txt                   # hash a token you chose
  softprompt serve --auth-tokens tokens.txt
  softprompt --token-file my-token.txt list              # or --token, or $SOFTPROMPT_TOKEN

The server reads the file when it starts: restart it to apply changes.
"""


def build_parser() -> argparse.ArgumentParser:
    """The `token` argument parser."""
    parser = argparse.ArgumentParser(
        prog="softprompt token",
        description="Make bearer tokens for a server started with --auth-tokens FILE, which stores "
                    "only their SHA-256 hashes.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    new = commands.add_parser(
        "new", help="make a random token and its token-file line",
        description="Print a new random token and the line that grants it ROLE (on tasks matching the "
                    "patterns, if any). With --append the line goes into the token file and only the "
                    "token is printed, so `TOKEN=$(softprompt token new infer --append tokens.txt)` works.",
    )
    new.add_argument("role", choices=[r.value for r in Role], help="infer: run prompts; admin: everything")
    new.add_argument("task_patterns", nargs="*", metavar="TASK_PATTERN",
                     help="limit the token to matching tasks (globs; '-' is the bare base model)")
    new.add_argument("--append", type=Path, metavar="FILE",
                     help="append the line to this token file (created readable by you only)")
    new.set_defaults(run=_new)
    hashed = commands.add_parser(
        "hash", help="print the stored form of a token read from stdin",
        description="Read a token from standard input (first line; prompted for without echo on a "
                    "terminal) and print its token-file hash, sha256:<hex>. Never pass tokens as arguments: "
                    "they would land in shell history and process lists.",
    )
    hashed.set_defaults(run=_hash)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `softprompt token`."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))


def _new(args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    line = format_entry(hash_token(token), Role(args.role), args.task_patterns)
    if args.append is None:
        print(f"token (give it to the client; the server keeps only its hash):\n  {token}")
        print(f"line for the --auth-tokens file:\n  {line}")
        return 0
    # The hashes are not secrets, but who may read the file is worth keeping tight.
    fd = os.open(args.append, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    print(f"added a {args.role} token to {args.append}; restart the server to use it", file=sys.stderr)
    print(token)
    return 0


def _hash(args: argparse.Namespace) -> int:
    token = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline()
    token = token.strip()
    if not token:
        print("error: no token on standard input", file=sys.stderr)
        return 1
    if len(token) < _SHORT_TOKEN:
        print(f"warning: a token under {_SHORT_TOKEN} characters is easy to guess; "
              "`softprompt token new` makes strong ones", file=sys.stderr)
    print(hash_token(token))
    return 0
