"""How the server is exposed: the localhost-only rule without tokens, TLS credentials, the startup line.

`prepare` reads and checks everything a secure start needs (token file, certificates) so that a bad
flag fails with a message naming it, before the model is loaded and before any port is bound.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass

import grpc
from softprompt.server.config import ServerConfig
from softprompt.server.access.tokens import TokenTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exposure:
    """The checked security settings of one server."""

    tokens: TokenTable | None  # None: no authentication
    credentials: grpc.ServerCredentials | None  # None: plaintext


def is_loopback(host: str) -> bool:
    """Whether `host` (as --host takes it: a name, an IPv4 or a bracketed IPv6 address) is this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def prepare(config: ServerConfig) -> Exposure:
    """Applies the localhost-only rule and loads the token file and TLS files; ValueError names the bad flag."""
    if config.auth_tokens is None and not is_loopback(config.host):
        raise ValueError(
            f"refusing to listen on {config.host} without authentication: anyone who can reach it could "
            "register, delete and train prompts. Pass --auth-tokens FILE (make tokens with `softprompt token "
            "new`), or keep the default --host 127.0.0.1"
        )
    tokens = None if config.auth_tokens is None else TokenTable.load(config.auth_tokens)
    return Exposure(tokens, _credentials(config))


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # The standard library checks what gRPC would only reject as "failed to bind": PEM syntax,
        # and that the key belongs to the certificate. An empty password fails encrypted keys
        # instead of prompting on the terminal; gRPC cannot use them anyway.
        context.load_cert_chain(config.tls_cert, config.tls_key, password=b"")
    except OSError as e:  # ssl.SSLError included
        raise ValueError(f"--tls-cert {config.tls_cert} with --tls-key {config.tls_key}: {e.strerror or e} "
                         "(both must be PEM; the key unencrypted and matching the certificate)") from None
    client_ca = None
    if config.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except OSError as e:  # ssl.SSLError included
            raise ValueError(f"--tls-client-ca {config.tls_client_ca}: {e.strerror or e} (it must hold PEM "
                             "certificates)") from None
        client_ca = config.tls_client_ca.read_bytes()
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def log_exposure(config: ServerConfig, exposure: Exposure, port: int) -> None:
    """One startup line saying who can connect and how."""
    address = f"{config.host}:{port}"
    transport = "plaintext"
    if exposure.credentials is not None:
        transport = "TLS, client certificates required" if config.tls_client_ca is not None else "TLS"
    if exposure.tokens is None:
        log.info("no --auth-tokens: the server requires no token and listens on %s only (this machine; %s)",
                 address, transport)
        return
    log.info("authentication on: %d token(s) from %s; listening on %s (%s)", len(exposure.tokens.entries),
             config.auth_tokens, address, transport)
    if exposure.credentials is None and not is_loopback(config.host):
        log.warning("tokens cross the network in clear text on %s: add --tls-cert and --tls-key", address)
