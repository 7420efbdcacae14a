"""Ports: a busy gRPC, HTTP or metrics port is refused (before the model loads, naming the flag), never shared,
and every port flag follows one rule (a number, 0 for a free port, `off` where a listener may be off).

The "other server" is a real gRPC server with gRPC's default options, SO_REUSEPORT included, as any earlier
softprompt release listened: a second server that also set SO_REUSEPORT would bind beside it and split its
traffic.
"""

from __future__ import annotations

import socket
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from softprompt.server import config as server_config
from softprompt.server.app.serve_cli import build_parser
from softprompt.server.app.serve_cli import main as serve_main
from softprompt.server.config import ServerConfig


@pytest.fixture
def busy_port():
    """A port a gRPC server with default options (SO_REUSEPORT on) listens on."""
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        yield port
    finally:
        other.stop(None)


@pytest.fixture
def listening_port():
    """A port a plain TCP socket listens on (as Prometheus' or uvicorn's would)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _serve_refuses(argv: list[str], tmp_path: Path) -> str:
    # A model path that does not exist: were the port not checked first, the start would fail on the model.
    with pytest.raises(SystemExit) as e:
        serve_main(["--model", str(tmp_path / "no-such-model"), "--store", str(tmp_path / "store"), *argv])
    return str(e.value.code)


def test_a_busy_grpc_port_is_refused_before_the_model_loads(busy_port, tmp_path):
    message = _serve_refuses(["--port", str(busy_port), "--http-port", "off"], tmp_path)
    assert f"127.0.0.1:{busy_port}" in message and "in use" in message and "--port" in message
    assert "no-such-model" not in message


def test_busy_http_and_metrics_ports_are_refused_before_the_model_loads(listening_port, tmp_path):
    message = _serve_refuses(["--port", "0", "--http-port", str(listening_port)], tmp_path)
    assert "in use" in message and "--http-port" in message and "--http-port off" in message
    message = _serve_refuses(["--port", "0", "--http-port", "off", "--metrics-port", str(listening_port)], tmp_path)
    assert "in use" in message and "--metrics-port" in message


def test_the_grpc_server_never_shares_a_busy_port(busy_port, tiny_base, tmp_path):
    """Past the early check (a server that took the port meanwhile), the bind itself fails: no SO_REUSEPORT."""
    from softprompt.server.app.ports import PortInUseError
    from softprompt.server.app.server import build_app, create_server

    app = build_app(ServerConfig(port=busy_port, http_port=None, store=tmp_path / "store"), base=tiny_base)
    try:
        with pytest.raises(PortInUseError, match="--port"):
            create_server(app)
    finally:
        app.scheduler.close(1.0)


def test_a_busy_metrics_port_is_refused_when_it_binds(listening_port, tiny_base, tmp_path):
    from softprompt.server.app.ports import PortInUseError
    from softprompt.server.app.server import build_app, shutdown, start

    app = build_app(ServerConfig(port=0, http_port=None, metrics_port=listening_port, store=tmp_path / "store"),
                    base=tiny_base)
    with pytest.raises(PortInUseError, match="--metrics-port"):
        start(app)
    app.scheduler.close(1.0)


# ---------------------------------------------------------------- one rule for every port flag


@pytest.mark.parametrize("flag", ["--port", "--http-port", "--metrics-port"])
def test_every_port_flag_takes_a_number_and_0_for_a_free_port(flag):
    dest = flag[2:].replace("-", "_")
    assert getattr(build_parser().parse_args([flag, "6001"]), dest) == 6001
    assert getattr(build_parser().parse_args([flag, "0"]), dest) == 0


@pytest.mark.parametrize("flag", ["--http-port", "--metrics-port"])
def test_off_turns_an_optional_listener_off(flag):
    dest = flag[2:].replace("-", "_")
    assert getattr(build_parser().parse_args([flag, "off"]), dest) is None
    assert getattr(build_parser().parse_args([flag, "OFF"]), dest) is None


@pytest.mark.parametrize("flag, value, expected", [
    ("--metrics-port", "nine", "expected a port number 0-65535 (0 picks a free port) or 'off', got 'nine'"),
    ("--http-port", "70000", "got '70000'"),
    ("--port", "off", "cannot be turned off"),
    ("--port", "-1", "expected a port number 0-65535 (0 picks a free port), got '-1'"),
])
def test_a_bad_port_is_a_usage_error_naming_the_flag(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and expected in err and "invalid literal" not in err


def test_the_metrics_port_needs_a_port_of_its_own():
    with pytest.raises(ValueError, match="--metrics-port"):
        ServerConfig(port=6001, metrics_port=6001)
    with pytest.raises(ValueError, match="--metrics-port"):
        ServerConfig(http_port=6002, metrics_port=6002)


def test_every_port_setting_is_parsed_by_the_one_function():
    import dataclasses

    parsers = {f.name: f.metadata["parse"] for f in dataclasses.fields(ServerConfig) if f.name.endswith("port")}
    assert parsers == {"port": server_config.port, "http_port": server_config.port_or_off,
                       "metrics_port": server_config.port_or_off}
