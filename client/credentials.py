"""How a client proves who it is: TLS settings for the channel and the bearer token sent with every call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["Pem", "TlsOptions", "bearer_metadata", "channel_credentials"]

# PEM data, or the path of a file holding it.
Pem = bytes | str | Path


@dataclass(frozen=True)
class TlsOptions:
    """TLS for the channel to the server.

    Attributes:
        ca_cert: the CA certificate(s) that signed the server's certificate; None trusts the
            system's roots.
        client_cert: this client's certificate chain, for servers that require one (mutual TLS).
        client_key: the private key of `client_cert` (unencrypted PEM).
        server_name: the name to verify the server's certificate against, when it differs from the
            host in the target (e.g. connecting by IP address to a certificate issued for a name).
    """

    ca_cert: Pem | None = None
    client_cert: Pem | None = None
    client_key: Pem | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key must be given together")


def channel_credentials(
    tls: TlsOptions | bool | None, credentials: grpc.ChannelCredentials | None
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
    """Channel credentials (None: plaintext) and the channel options `tls` needs.

    `tls=True` means TLS with the system's roots. `credentials`, ready-made, excludes `tls`.
    """
    if credentials is not None:
        if tls:
            raise ValueError("pass either tls or credentials, not both")
        return credentials, []
    if not tls:
        return None, []
    options = TlsOptions() if tls is True else tls
    made = grpc.ssl_channel_credentials(
        root_certificates=_pem(options.ca_cert),
        private_key=_pem(options.client_key),
        certificate_chain=_pem(options.client_cert),
    )
    overrides = [] if options.server_name is None else [("grpc.ssl_target_name_override", options.server_name)]
    return made, overrides


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (none without one)."""
    if token is None:
        return ()
    if not token or token != token.strip() or not token.isprintable():
        raise ValueError("the token must be non-empty printable text without surrounding whitespace")
    return (("authorization", f"Bearer {token}"),)


def _pem(value: Pem | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).expanduser().read_bytes()
