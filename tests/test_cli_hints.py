"""The CLI adds a hint to an error only where the hint is the likely cause.

- UNAVAILABLE that the server itself answered (its prompt store is down) is the server's word: no "is the server
  running?"; UNAVAILABLE because nothing answered gets that hint.
- UNIMPLEMENTED for a Training call is an endpoint without training (a Ray Serve deployment): the hint says so
  and what to do instead; for other calls, an older server.
"""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
import pytest

from helpers import running_server
from softprompt.client import Client, NotFoundError, UnavailableError
from softprompt.client.cli import main
from softprompt.prompts.errors import StoreUnavailableError
from softprompt.protos import softprompt_pb2_grpc as pb_grpc

STORE_DOWN = "the prompt store s3://team/prompts is unavailable: could not connect to http://minio:9000"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_store_outage_is_not_blamed_on_the_server(tiny_base, tmp_path, capsys, monkeypatch):
    with running_server(tiny_base, tmp_path / "store") as (app, address):
        def down(ref):
            raise StoreUnavailableError(STORE_DOWN)

        monkeypatch.setattr(app.registry, "resolve", down)
        assert main(["--server", address, "show", "s3t@1"]) == 1
        err = capsys.readouterr().err
        assert f"UNAVAILABLE: {STORE_DOWN}" in err
        assert "is the server running" not in err and "softprompt serve" not in err
        with Client(address, timeout=30) as client, pytest.raises(UnavailableError) as e:
            client.get_prompt("s3t@1")
        assert e.value.request_id and e.value.rpc == "Registry/GetPrompt"


def test_errors_carry_the_request_id_the_server_logged(tiny_base, tmp_path):
    with running_server(tiny_base, tmp_path / "store") as (_, address), Client(address, timeout=30) as client:
        with pytest.raises(NotFoundError) as e:
            client.get_prompt("nosuch")
    assert e.value.request_id and len(e.value.request_id) == 16 and e.value.rpc == "Registry/GetPrompt"


def test_no_server_gets_the_is_it_running_hint(capsys):
    address = f"127.0.0.1:{_closed_port()}"
    assert main(["--server", address, "--timeout", "10", "list"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and f"is the server running at {address}?" in err


@pytest.fixture
def inference_only():
    """A gRPC endpoint that serves Inference and Registry but not Training, as Ray Serve's proxy does."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServicer_to_server(pb_grpc.InferenceServicer(), server)
    pb_grpc.add_RegistryServicer_to_server(pb_grpc.RegistryServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_training_on_an_endpoint_without_it_says_what_to_do(inference_only, capsys):
    assert main(["--server", inference_only, "jobs", "list"]) == 1
    err = capsys.readouterr().err
    assert "UNIMPLEMENTED" in err and "does not serve training" in err and "Ray Serve" in err
    assert "softprompt train --store" in err and "older than this client" not in err


def test_another_missing_call_suggests_an_older_server(inference_only, capsys):
    assert main(["--server", inference_only, "info"]) == 1
    err = capsys.readouterr().err
    assert "UNIMPLEMENTED" in err and "older than this client" in err and "training" not in err


def test_the_help_says_serve_starts_both_apis(capsys):
    main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    serve = out[out.index(" serve start the server"):].split(" bench ")[0]
    assert "gRPC" in serve and "HTTP API" in serve
