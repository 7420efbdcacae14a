"""The one hand-off from the command line to server-side code.

`softprompt.client` imports nothing from the server (or the benchmarks) except through this module,
and this module imports it only when a command that needs it runs: the server side pulls in torch and
transformers, which a client-only install lacks. A missing server extra becomes advice to install
it; any other import failure is a bug and keeps its traceback.

Server-side commands and what runs them:
  serve          softprompt.server.app.serve_cli.main(argv) -> int
  bench          softprompt.benchmarks.cli.main(argv) -> int
  token          softprompt.server.access.token_cli.main(argv) -> int
  train --store  softprompt.server.app.train_local.run_local_training(**keyword arguments) -> int
The first three get their argv untouched and parse it themselves; `train` is parsed here.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

# Commands run wholly by a server-side module's main(argv) -> int, by command name.
COMMANDS: dict[str, str] = {
    "serve": "softprompt.server.app.serve_cli",
    "bench": "softprompt.benchmarks.cli",
    "token": "softprompt.server.access.token_cli",
}
_LOCAL_TRAINING = "softprompt.server.app.train_local"

# Top-level modules of the `server` extra (pyproject.toml) that a client-only install lacks.
_SERVER_EXTRAS = frozenset(
    {"torch", "numpy", "transformers", "peft", "safetensors", "gguf", "accelerate", "tqdm",
     "matplotlib", "grpc_health", "grpc_reflection"}
)


def run_command(command: str, argv: list[str]) -> int:
    """Runs server-side command `command` (a key of COMMANDS) on `argv`; returns its exit status."""
    status = _call(command, COMMANDS[command], "main", argv)
    return status if isinstance(status, int) else 0


def train_locally(**arguments: Any) -> int:
    """Runs `softprompt train --store`: run_local_training(**arguments) in this process."""
    status: int = _call("train --store", _LOCAL_TRAINING, "run_local_training", **arguments)
    return status


def _call(command: str, module: str, function: str, *args: Any, **kwargs: Any) -> Any:
    """Imports `module` and calls its `function`; reports a missing server extra (status 1)."""
    try:
        return getattr(importlib.import_module(module), function)(*args, **kwargs)
    except ModuleNotFoundError as e:  # raised by the import, or by imports the call makes later
        return _missing_server_extra(e, command)


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
