"""Refusing a port another process listens on, before the (slow) model load and again where each listener binds.

gRPC sets SO_REUSEPORT on its listening sockets by default, so a second server on a busy gRPC port would bind
beside the first and the kernel would split connections between the two. The server turns that option off
(`server.create_server`), which makes the bind itself fail; `check_free` says so earlier, naming the flag, before
the model loads. The check binds a throwaway socket without SO_REUSEPORT (with SO_REUSEADDR, as every listener
here sets it, so a port left in TIME_WAIT by a server that just stopped is not mistaken for a busy one).
"""

from __future__ import annotations

import errno
import socket

from softprompt.server.config import ServerConfig


class PortInUseError(OSError):
    """A listener's port is taken; the message names the flag that chooses it."""


def in_use_message(host: str, port: int, flag: str, what: str, *, off: bool = False) -> str:
    """What to tell the operator about a busy port: where, which flag, and what to do."""
    return (f"{what} cannot listen on {host}:{port}: the port is in use (another server is listening there); stop "
            f"that server or choose another port with {flag}" + (f" (or turn it off with {flag} off)" if off else ""))


def check_free(host: str, port: int, flag: str, what: str, *, off: bool = False) -> None:
    """Raises PortInUseError if some process listens on `host:port`; port 0 (a free one) always passes.

    Only "address in use" counts: an address this machine lacks, or a privileged port, is left for the real bind
    to report in its own words.
    """
    if port == 0:
        return
    bare = host.strip("[]")
    try:
        addresses = socket.getaddrinfo(bare or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # an unresolvable host: the real bind says so
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUseError(in_use_message(host, port, flag, what, off=off)) from None


def check_ports(config: ServerConfig) -> None:
    """Checks every port `config` listens on (gRPC, the HTTP API, metrics) before anything loads."""
    check_free(config.host, config.port, "--port", "the gRPC server")
    if config.http_port is not None:
        check_free(config.host, config.http_port, "--http-port", "the OpenAI-compatible HTTP API", off=True)
    if config.metrics_port is not None:
        check_free(config.host, config.metrics_port, "--metrics-port", "the metrics endpoint", off=True)
