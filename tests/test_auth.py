"""Bearer tokens, roles, task patterns and TLS, end to end over real loopback ports.

Servers are the real ones (`build_app` + `start`) on the tiny model, started with a token file
and, for the TLS tests, certificates from a throwaway CA issued here with `cryptography`.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from helpers import running_server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from softprompt.client import AsyncClient, Client, TlsOptions, TrainingOptions
from softprompt.client import errors as client_errors
from softprompt.client.cli import main as cli_main
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc
from softprompt.server.grpc_api.interceptors import auth
from softprompt.server.grpc_api import exposure as security
from softprompt.server.app.serve_cli import main as serve_main
from softprompt.server.config import ServerConfig
from softprompt.server.access.tokens import (
    Role,
    TokenEntry,
    TokenFileError,
    TokenTable,
    format_entry,
    hash_token,
)
from helpers import synthetic

ADMIN = "admin-token-0123456789abcdef"
INFER = "infer-token-0123456789abcdef"
INFER_SENTIMENT = "infer-sentiment-token-0123456789"  # sentiment* and the bare model only
ADMIN_TEAM = "admin-team-token-0123456789"  # team-* only
UNKNOWN = "not-a-token-of-this-server-0123"

AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
ADMIN_ONLY = {
    "Registry/RegisterPrompt", "Registry/DeletePrompt", "Registry/SetAlias",
    "Training/TrainPrompt", "Training/GetTrainingJob", "Training/WatchTrainingJob",
    "Training/CancelTrainingJob", "Training/ListTrainingJobs",
}
METHODS = [(service, method) for service in pb.DESCRIPTOR.services_by_name.values() for method in service.methods]
FAST = TrainingOptions(num_virtual_tokens=4, epochs=1, max_steps=1, batch_size=8, patience=0)


def _id(item: tuple) -> str:
    return f"{item[0].name}/{item[1].name}"


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens.txt"
    path.write_text("\n".join([
        "# softprompt tokens",
        format_entry(hash_token(ADMIN), Role.ADMIN),
        "",
        format_entry(hash_token(INFER), Role.INFER) + "   # a comment after the line",
        format_entry(hash_token(INFER_SENTIMENT), Role.INFER, ["sentiment*", "-"]),
        format_entry(hash_token(ADMIN_TEAM), Role.ADMIN, ["team-*"]),
    ]) + "\n")
    return path


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory, token_file) -> Iterator[str]:
    with running_server(tiny_base, tmp_path_factory.mktemp("store"), auth_tokens=token_file, max_new_tokens=16,
                        default_max_new_tokens=4, max_virtual_tokens=32, batch_wait_ms=1) as (_, address):
        yield address


@pytest.fixture(scope="module")
def prompts(server, tiny_base) -> str:
    """Registers `sentiment`, `summarize` and `team-a`; returns the id of a (cancelled) `summarize` training job."""
    hidden = tiny_base.spec.hidden_size
    with Client(server, timeout=60, token=ADMIN) as admin:
        for i, name in enumerate(("sentiment", "summarize", "team-a")):
            admin.register(name, torch.randn(3, hidden, generator=torch.Generator().manual_seed(i)))
        job = admin.train("summarize", _examples(1), options=FAST)
        admin.cancel_training_job(job.job_id)
        return job.job_id


def _examples(seed: int) -> list[dict[str, str]]:
    return [{"input": e.input, "target": e.target} for e in synthetic(16, seed)]


def _status(address: str, service, method, metadata=(), request=None) -> tuple[grpc.StatusCode, str]:
    """Calls one RPC with an empty (or given) request; returns its status code and details."""
    with grpc.insecure_channel(address) as channel:
        stub = getattr(pb_grpc, f"{service.name}Stub")(channel)
        request = request if request is not None else getattr(pb, method.input_type.name)()
        try:
            answer = getattr(stub, method.name)(request, metadata=metadata, timeout=60)
            if method.server_streaming:
                list(answer)
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# ---------------------------------------------------------------------- every RPC, every refusal


def test_every_rpc_has_a_rule():
    paths = {f"/{service.full_name}/{method.name}" for service, method in METHODS}
    rules = auth.rules(lambda job_id: None)
    assert set(rules) == paths
    assert {p.split(".")[-1] for p, rule in rules.items() if rule.role is Role.ADMIN} == ADMIN_ONLY


@pytest.mark.parametrize("call", METHODS, ids=_id)
def test_no_token_is_unauthenticated(server, call):
    code, details = _status(server, *call)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in details


@pytest.mark.parametrize("call", METHODS, ids=_id)
def test_unknown_token_is_unauthenticated(server, call):
    code, details = _status(server, *call, metadata=_bearer(UNKNOWN))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid" in details and UNKNOWN not in details


@pytest.mark.parametrize("call", METHODS, ids=_id)
def test_malformed_authorization_is_unauthenticated(server, call):
    code, details = _status(server, *call, metadata=(("authorization", f"Token {ADMIN}"),))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in details and ADMIN not in details


@pytest.mark.parametrize("value", ["Bearer", "Bearer   ", ADMIN, f"Basic {ADMIN}"])
def test_other_malformed_headers(server, value):
    service, method = METHODS[0]
    assert _status(server, service, method, metadata=(("authorization", value),))[0] == grpc.StatusCode.UNAUTHENTICATED


def test_two_authorization_headers_are_refused(server):
    service, method = METHODS[0]
    code, _ = _status(server, service, method, metadata=_bearer(ADMIN) + _bearer(INFER))
    assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("call", METHODS, ids=_id)
def test_infer_role(server, call):
    code, details = _status(server, *call, metadata=_bearer(INFER))
    if _id(call) in ADMIN_ONLY:
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert f"{_id(call)} needs a token with the admin role; this one has the infer role" in details
    else:
        assert code not in AUTH_CODES, details


@pytest.mark.parametrize("call", METHODS, ids=_id)
def test_admin_role_passes_everywhere(server, call):
    code, details = _status(server, *call, metadata=_bearer(ADMIN))
    assert code not in AUTH_CODES, details


def test_scheme_is_case_insensitive(server):
    service = pb.DESCRIPTOR.services_by_name["Inference"]
    code, _ = _status(server, service, service.methods_by_name["ModelInfo"], metadata=(("authorization", f"bearer {INFER}"),))
    assert code == grpc.StatusCode.OK


# ---------------------------------------------------------------------- open services


def test_health_and_reflection_need_no_token(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"softprompt.v1.Inference", "softprompt.v1.Registry", "softprompt.v1.Training"} <= names


# ---------------------------------------------------------------------- the Python client


def test_client_sends_its_token_and_raises_typed_errors(server, prompts):
    with Client(server, timeout=60, token=INFER) as client:
        assert client.generate("sentiment", "hello", max_new_tokens=2).prompt_version == "sentiment@1"
        assert list(client.stream("summarize", "hello", max_new_tokens=2))[-1].finish_reason is not None
        assert {p.name for p in client.list_prompts()} >= {"sentiment", "summarize", "team-a"}
        with pytest.raises(client_errors.PermissionDeniedError, match="admin role"):
            client.set_alias("sentiment", "prod", 1)
        with pytest.raises(client_errors.PermissionDeniedError):
            list(client.watch_training_job(prompts))
    with Client(server, timeout=60) as anonymous, pytest.raises(client_errors.UnauthenticatedError, match="Bearer"):
        anonymous.model_info()
    with Client(server, timeout=60, token=UNKNOWN) as wrong, pytest.raises(client_errors.UnauthenticatedError):
        list(wrong.stream("sentiment", "hello"))


def test_async_client_sends_its_token(server, prompts):
    async def run() -> None:
        async with AsyncClient(server, timeout=60, token=INFER_SENTIMENT) as client:
            assert (await client.generate("sentiment", "hi", max_new_tokens=2)).prompt_version == "sentiment@1"
            chunks = [c async for c in client.stream("", "hi", max_new_tokens=2)]
            assert chunks[-1].finish_reason is not None
            with pytest.raises(client_errors.PermissionDeniedError, match="summarize"):
                await client.classify("summarize", "hi", ["a", "b"])
        async with AsyncClient(server, timeout=60) as anonymous:
            with pytest.raises(client_errors.UnauthenticatedError):
                await anonymous.model_info()

    asyncio.run(run())


@pytest.mark.parametrize("token", ["", " padded", "two\nlines"])
def test_client_refuses_unsendable_tokens(token):
    with pytest.raises(ValueError, match="token"):
        Client("127.0.0.1:1", token=token)


# ---------------------------------------------------------------------- task patterns


def test_infer_token_limited_to_task_patterns(server, prompts):
    with Client(server, timeout=60, token=INFER_SENTIMENT) as client:
        assert client.generate("sentiment@1", "hello", max_new_tokens=2).prompt_version == "sentiment@1"
        assert client.generate("", "hello", max_new_tokens=2).prompt_version == ""  # '-': the bare model
        assert client.get_prompt("sentiment").ref == "sentiment@1"
        assert [p.name for p in client.list_prompts()] == ["sentiment"]
        assert client.tokenize("hello").token_ids  # no task involved
        for denied in (lambda: client.generate("summarize", "hello"),
                       lambda: list(client.stream("summarize@1", "hello")),
                       lambda: client.classify("team-a", "hello", ["a", "b"]),
                       lambda: client.get_prompt("summarize@latest"),
                       lambda: client.list_prompts("summarize")):
            with pytest.raises(client_errors.PermissionDeniedError, match="limited to tasks matching sentiment\\* -"):
                denied()


def test_bare_model_needs_the_dash_pattern(server, prompts):
    with (Client(server, timeout=60, token=ADMIN_TEAM) as client,
          pytest.raises(client_errors.PermissionDeniedError, match="bare base model")):
        client.generate("", "hello", max_new_tokens=2)


def test_admin_token_limited_to_task_patterns(server, prompts, tiny_base):
    summarize_job = prompts
    with Client(server, timeout=60, token=ADMIN_TEAM) as client:
        info = client.register("team-b", torch.zeros(2, tiny_base.spec.hidden_size))
        assert info.ref == "team-b@1"
        assert client.set_alias("team-b", "prod", 1).aliases == ("prod",)
        own = client.train("team-c", _examples(2), options=FAST)
        client.cancel_training_job(own.job_id)
        assert [j.job_id for j in client.list_training_jobs()] == [own.job_id]
        assert {p.name for p in client.list_prompts()} == {"team-a", "team-b"}
        for denied in (lambda: client.register("other", torch.zeros(2, tiny_base.spec.hidden_size)),
                       lambda: client.set_alias("sentiment", "prod", 1),
                       lambda: client.delete_prompt("sentiment", all_versions=True),
                       lambda: client.train("other", _examples(3), options=FAST),
                       # a warm start reads another task's prompt
                       lambda: client.train("team-d", _examples(3), options=TrainingOptions(init="from:sentiment@1")),
                       lambda: client.get_training_job(summarize_job),
                       lambda: client.cancel_training_job(summarize_job),
                       lambda: client.wait_for_training_job(summarize_job)):
            with pytest.raises(client_errors.PermissionDeniedError, match="team-\\*"):
                denied()
        with pytest.raises(client_errors.NotFoundError):  # unknown jobs are the servicer's to report
            client.get_training_job("no-such-job")
    with Client(server, timeout=60, token=ADMIN) as admin:
        assert admin.get_prompt("sentiment").ref == "sentiment@1"  # nothing was deleted
        assert {j.job_id for j in admin.list_training_jobs()} >= {own.job_id, summarize_job}


# ---------------------------------------------------------------------- the CLI


def test_cli_with_token(server, prompts, token_file, monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("SOFTPROMPT_TOKEN", raising=False)
    assert cli_main(["--server", server, "--token", INFER, "list", "--json"]) == 0
    assert "sentiment@1" in capsys.readouterr().out

    assert cli_main(["--server", server, "show", "sentiment"]) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and "--token-file" in err

    token_path = tmp_path / "token"
    token_path.write_text(INFER_SENTIMENT + "\n")
    assert cli_main(["show", "sentiment", "--server", server, "--token-file", str(token_path)]) == 0
    assert cli_main(["show", "summarize", "--server", server, "--token-file", str(token_path)]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err

    monkeypatch.setenv("SOFTPROMPT_TOKEN", INFER)
    assert cli_main(["--server", server, "generate", "-", "hello", "--max-new-tokens", "2"]) == 0
    assert cli_main(["--server", server, "alias", "sentiment", "prod", "1"]) == 1
    assert "needs a token with the admin role" in capsys.readouterr().err
    assert cli_main(["--server", server, "--token", ADMIN, "alias", "sentiment", "prod", "1"]) == 0  # --token wins


def test_cli_token_new_and_hash(tmp_path, monkeypatch, capsys):
    path = tmp_path / "tokens.txt"
    assert cli_main(["token", "new", "infer", "sentiment*", "-", "--append", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert path.stat().st_mode & 0o077 == 0
    entry = TokenTable.load(path).lookup(token)
    assert entry is not None and entry.role is Role.INFER and entry.task_patterns == ("sentiment*", "-")
    assert token not in path.read_text()

    assert cli_main(["token", "new", "admin"]) == 0
    out = capsys.readouterr().out
    assert "sha256:" in out and "admin" in out

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{ADMIN}\n"))
    assert cli_main(["token", "hash"]) == 0
    assert capsys.readouterr().out.strip() == hash_token(ADMIN)


def test_cli_help_teaches_auth(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--token", "--token-file", "SOFTPROMPT_TOKEN", "--tls", "--ca-cert", "--client-cert", "--client-key"):
        assert flag in out
    assert cli_main(["token", "--help"]) == 0
    assert "infer" in capsys.readouterr().out


# ---------------------------------------------------------------------- the token file


def test_token_file_format(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n\n  {hash_token('a' * 20)}  admin\n{hash_token('b' * 20)} infer x* y # note\n")
    table = TokenTable.load(path)
    assert table.lookup("a" * 20) == TokenEntry(hash_token("a" * 20), Role.ADMIN, (), 3)
    assert table.lookup("b" * 20) == TokenEntry(hash_token("b" * 20), Role.INFER, ("x*", "y"), 4)
    assert table.lookup("c" * 20) is None
    assert table.lookup("b" * 20).allows_task("x1") and not table.lookup("b" * 20).allows_task("X1")


@pytest.mark.parametrize(("text", "message"), [
    ("my-plain-secret-token infer\n", "line 1: the first field must be sha256:"),
    (f"{hash_token('x')}\n", "line 1: a role must follow"),
    (f"\n{hash_token('x')} root\n", "line 2: unknown role 'root'"),
    (f"{hash_token('x')} infer\n{hash_token('x')} admin\n", "line 2: the same token is listed twice"),
    (f"{hash_token('x').upper()} infer\n", "line 1: the first field"),
    ("# nothing\n", "lists no token"),
])
def test_bad_token_files(tmp_path, text, message):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(TokenFileError, match=message) as error:
        TokenTable.load(path)
    assert "my-plain-secret-token" not in str(error.value)


def test_missing_token_file_fails_before_the_model_loads(tmp_path):
    with pytest.raises(SystemExit, match="cannot read the token file"):
        serve_main(["--auth-tokens", str(tmp_path / "absent")])


# ---------------------------------------------------------------------- localhost only without tokens


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "LOCALHOST", "::1", "[::1]"])
def test_loopback_hosts(host):
    assert security.is_loopback(host)
    security.prepare(ServerConfig(host=host))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "192.168.1.10", "example.com", ""])
def test_other_hosts_need_tokens(host, token_file):
    assert not security.is_loopback(host)
    with pytest.raises(ValueError, match="--auth-tokens"):
        security.prepare(ServerConfig(host=host))
    assert security.prepare(ServerConfig(host=host, auth_tokens=token_file)).tokens is not None


def test_server_refuses_to_bind_everywhere_without_tokens(tiny_base, tmp_path):
    with (pytest.raises(ValueError, match="refusing to listen on 0.0.0.0 without authentication"),
          running_server(tiny_base, tmp_path, host="0.0.0.0")):
        pass
    with pytest.raises(SystemExit, match="--auth-tokens"):
        serve_main(["--host", "0.0.0.0"])


def test_no_tokens_on_localhost_logs_it(tiny_base, tmp_path, caplog):
    caplog.set_level("INFO", logger="softprompt.server.grpc_api.exposure")
    with running_server(tiny_base, tmp_path) as (_, address), Client(address, timeout=60) as client:
        assert client.model_info().hidden_size == tiny_base.spec.hidden_size
    assert "requires no token" in caplog.text


# ---------------------------------------------------------------------- TLS


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer: x509.Certificate | None, issuer_key, *, ca: bool, sans=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost, a client one, and a stranger's."""
    out = tmp_path_factory.mktemp("pki")

    def write(name: str, cert: x509.Certificate, key) -> None:
        (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    ca_key, rogue_key = _key(), _key()
    ca = _cert("softprompt test CA", ca_key, None, ca_key, ca=True)
    rogue = _cert("someone else's CA", rogue_key, None, rogue_key, ca=True)
    write("ca", ca, ca_key)
    server_key = _key()
    write("server", _cert("localhost", server_key, ca, ca_key, ca=False, sans=[
        x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), server_key)
    client_key, stranger_key = _key(), _key()
    write("client", _cert("client", client_key, ca, ca_key, ca=False), client_key)
    write("stranger", _cert("stranger", stranger_key, rogue, rogue_key, ca=False), stranger_key)
    return {name: out / name for name in ("ca", "server", "client", "stranger")}


def _pem(pki: dict[str, Path], name: str) -> tuple[Path, Path]:
    return pki[name].with_suffix(".pem"), pki[name].with_suffix(".key")


@pytest.fixture(scope="module")
def tls_server(tiny_base, tmp_path_factory, pki, token_file) -> Iterator[str]:
    cert, key = _pem(pki, "server")
    with running_server(tiny_base, tmp_path_factory.mktemp("store"), auth_tokens=token_file, tls_cert=cert,
                        tls_key=key) as (_, address):
        yield address


def test_tls_round_trip(tls_server, pki, capsys):
    ca = _pem(pki, "ca")[0]
    with Client(tls_server, timeout=30, token=INFER, tls=TlsOptions(ca_cert=ca)) as client:
        assert client.model_info().hidden_size > 0
    port = tls_server.rsplit(":", 1)[1]
    with Client(f"localhost:{port}", timeout=30, token=INFER, tls=TlsOptions(ca_cert=ca.read_bytes())) as client:
        assert client.tokenize("hello").token_ids
    with Client(tls_server, timeout=30, token=INFER) as plaintext, pytest.raises(client_errors.UnavailableError):
        plaintext.model_info()
    with Client(tls_server, timeout=30, token=INFER, tls=True) as untrusted, pytest.raises(client_errors.UnavailableError):
        untrusted.model_info()  # the system's roots did not sign the test CA
    with (Client(tls_server, timeout=30, tls=TlsOptions(ca_cert=ca)) as anonymous,
          pytest.raises(client_errors.UnauthenticatedError)):
        anonymous.model_info()

    assert cli_main(["--server", tls_server, "--ca-cert", str(ca), "--token", INFER, "info", "--json"]) == 0
    assert '"hidden_size"' in capsys.readouterr().out
    assert cli_main(["--server", tls_server, "--token", INFER, "info"]) == 1
    assert "add --tls" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mtls_server(tiny_base, tmp_path_factory, pki) -> Iterator[str]:
    cert, key = _pem(pki, "server")
    store = tmp_path_factory.mktemp("store")
    with running_server(tiny_base, store, tls_cert=cert, tls_key=key, tls_client_ca=_pem(pki, "ca")[0]) as (_, address):
        yield address


def test_the_http_api_uses_the_same_tls_files_and_client_certificates(tiny_base, tmp_path, pki, token_file):
    import httpx
    import ssl

    cert, key = _pem(pki, "server")
    ca = _pem(pki, "ca")[0]
    with running_server(tiny_base, tmp_path / "store", http_port=0, auth_tokens=token_file, tls_cert=cert, tls_key=key,
                        tls_client_ca=ca) as (app, _):
        url = f"https://127.0.0.1:{app.http_port}/v1/models"
        trusted = ssl.create_default_context(cafile=str(ca))
        trusted.load_cert_chain(*_pem(pki, "client"))
        response = httpx.get(url, verify=trusted, headers={"Authorization": f"Bearer {INFER}"}, timeout=30)
        assert response.status_code == 200 and response.json()["object"] == "list"
        assert httpx.get(url, verify=trusted, timeout=30).status_code == 401  # TLS is no substitute for a token
        no_cert = ssl.create_default_context(cafile=str(ca))
        with pytest.raises(httpx.HTTPError):
            httpx.get(url, verify=no_cert, headers={"Authorization": f"Bearer {INFER}"}, timeout=30).raise_for_status()
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https", "http"), timeout=30).raise_for_status()


def test_mutual_tls(mtls_server, pki):
    ca = _pem(pki, "ca")[0]
    cert, key = _pem(pki, "client")
    with Client(mtls_server, timeout=30, tls=TlsOptions(ca_cert=ca, client_cert=cert, client_key=key)) as client:
        assert client.model_info().hidden_size > 0
    with Client(mtls_server, timeout=30, tls=TlsOptions(ca_cert=ca)) as no_cert, pytest.raises(client_errors.UnavailableError):
        no_cert.model_info()
    cert, key = _pem(pki, "stranger")
    with (Client(mtls_server, timeout=30, tls=TlsOptions(ca_cert=ca, client_cert=cert, client_key=key)) as stranger,
          pytest.raises(client_errors.UnavailableError)):
        stranger.model_info()


def test_mutual_tls_cli(mtls_server, pki, capsys):
    cert, key = _pem(pki, "client")
    ca = str(_pem(pki, "ca")[0])
    assert cli_main(["--server", mtls_server, "--ca-cert", ca, "--client-cert", str(cert), "--client-key", str(key),
                     "list"]) == 0
    assert cli_main(["--server", mtls_server, "--ca-cert", ca, "--client-cert", str(cert), "list"]) == 1
    assert "--client-cert and --client-key" in capsys.readouterr().err


def test_bad_tls_files_are_named(pki, tmp_path):
    cert, _ = _pem(pki, "server")
    _, other_key = _pem(pki, "client")
    with pytest.raises(ValueError, match="--tls-cert .* with --tls-key"):
        security.prepare(ServerConfig(tls_cert=cert, tls_key=other_key))
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(ValueError, match="--tls-client-ca"):
        security.prepare(ServerConfig(tls_cert=cert, tls_key=_pem(pki, "server")[1], tls_client_ca=not_pem))
