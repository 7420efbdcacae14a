"""The `softprompt` command: start the server, manage and train prompts, and run them from the shell.

Every command except `serve`, `bench`, `token` and `train --store` talks to a running server through
`softprompt.client.Client` and imports only the standard library, grpcio, protobuf and the torch-free
`softprompt.prompts` modules, so it starts fast and installs light. Those four run server-side code,
reached only through `handoff`, which imports it when the command runs.

Modules: `app` (top-level parser, global options, dispatch, error reporting), one module per command
group (`registry`, `inference`, `training`, `jobs`, `serving`), `parsing` (what they share to declare
and read their arguments), `render` (how results are printed) and `handoff`.
"""

from softprompt.client.cli.app import build_parser, main

__all__ = ["main", "build_parser"]
