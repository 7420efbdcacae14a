"""Runs the HTTP API with uvicorn on a thread of the serving process, beside the gRPC server.

The socket is bound before the thread starts, so a port in use fails `start` with a message naming
the flag, and port 0 (tests) picks a free one. TLS uses the same files as gRPC: `--tls-cert` and
`--tls-key`, and with `--tls-client-ca` client certificates are required (mutual TLS).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 30.0


class HttpServer:
    """One uvicorn server on its own thread and event loop."""

    def __init__(self, app: FastAPI, host: str, port: int, *, tls_cert: Path | None = None,
                 tls_key: Path | None = None, tls_client_ca: Path | None = None) -> None:
        ssl_options = {}
        if tls_cert is not None and tls_key is not None:
            ssl_options = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)}
            if tls_client_ca is not None:
                ssl_options |= {"ssl_ca_certs": str(tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.tls = bool(ssl_options)
        bare = host.strip("[]")  # gRPC takes "[::]"; sockets want the bare address
        family = socket.AF_INET6 if ":" in bare else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((bare, port))
        except OSError as e:
            self._socket.close()
            raise OSError(f"could not bind the HTTP API to {host}:{port} ({e.strerror}): is another server using "
                          "the port? Choose another with --http-port, or turn it off with --http-port off") from None
        self.port = int(self._socket.getsockname()[1])
        # log_config None: uvicorn leaves logging alone and its records go through the server's own format.
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5, **ssl_options)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="softprompt-http", daemon=True)

    def start(self) -> int:
        """Starts serving; returns the bound port once uvicorn accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP API did not start: see the log above")
            time.sleep(0.01)
        return self.port

    def stop(self) -> None:
        """Stops taking connections, lets open responses end (up to uvicorn's graceful timeout), closes the port."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
