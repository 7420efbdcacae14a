"""softprompt on Ray Serve: a local Ray instance, two replicas of the tiny model, Ray Serve's gRPC ingress.

Real parts only: `ray.init` on this machine, the deployment and builder of `server/app/ray_serve.py`, Ray's
own gRPC and HTTP proxies on free loopback ports, and plain gRPC stubs and httpx as clients (they send the
per-request `multiplexed_model_id` metadata that routes by task). Prompts are registered in a local folder store that
both replicas read. Outputs are compared with the no-cache greedy reference.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import ray
import torch
from ray import serve

from helpers import expected_ids, wait_until
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.registry import Registry
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos import softprompt_pb2_grpc as pb_grpc
from softprompt.server.access.tokens import Role, format_entry, hash_token
from softprompt.server.app.ray_serve import (
    GRPC_SERVICER_FUNCTIONS,
    Deployment,
    ProxyListeners,
    build,
    proxy_listeners,
)

ADMIN = "admin-token-for-ray-tests-0001"
INFER_ALPHA = "infer-token-alpha-only-00001"  # may use task "alpha" only
APP = "softprompt"
TEXTS = ["the quick brown fox", "hello", "a soft prompt is a small matrix of", "one frozen model serves"]
NEW_TOKENS = 8
LONG = 200  # tokens of the streams a replica dies under: still running when it does
SEEDS = {"alpha": 3, "beta": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompt(task: str, hidden: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEEDS[task])
    return torch.randn(4 + SEEDS[task], hidden, generator=g) * 0.5


def _replica_names() -> set[str]:
    """The names of the live replica actors of the app (Ray Serve names them SERVE_REPLICA::<app>#...)."""
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#")}


def _running_replicas() -> int:
    status = serve.status().applications.get(APP)
    if status is None or status.status != "RUNNING":
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


@pytest.fixture(scope="module")
def ingress(tiny_model_dir: Path, tiny_base, tmp_path_factory: pytest.TempPathFactory):
    """Two replicas behind Ray Serve's proxies: yields the gRPC proxy's address and the HTTP proxy's URL."""
    store = tmp_path_factory.mktemp("ray-store")
    registry = Registry(store)
    for task in SEEDS:
        registry.register(task, PromptTensor(_prompt(task, tiny_base.spec.hidden_size), "RAW"), tiny_base.spec)
    tokens = tmp_path_factory.mktemp("ray-auth") / "tokens.txt"
    tokens.write_text(format_entry(hash_token(ADMIN), Role.ADMIN) + "\n"
                      + format_entry(hash_token(INFER_ALPHA), Role.INFER, ["alpha"]) + "\n")
    flags = [f"--model={tiny_model_dir}", "--device=cpu", f"--store={store}", f"--auth-tokens={tokens}",
             "--max-batch-size=8", f"--max-new-tokens={LONG}", f"--default-max-new-tokens={NEW_TOKENS}",
             "--kv-cache-memory=64MiB", "--prompt-cache-mb=8", "--prefix-cache-mb=8", "--batch-wait-ms=2"]
    port, http_port = _free_port(), _free_port()
    # Logical CPUs: one per replica and room for Ray's own actors; the tiny model needs no more.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        # What deploy/ray/serve_config.yaml sets per deployment, here in code: two replicas, and Ray's health
        # check every second so that a killed replica is noticed and replaced quickly.
        # With the proxies' listeners, as `build` binds it: gRPC is held to http_options.host's scope.
        app = Deployment.options(num_replicas=2, health_check_period_s=1).bind(flags, proxy_listeners())
        serve.run(app, name=APP)
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def channel(ingress: tuple[str, str]):
    with grpc.insecure_channel(ingress[0]) as ch:
        yield ch


def _metadata(token: str, task: str = "") -> list[tuple[str, str]]:
    metadata = [("authorization", f"Bearer {token}")]
    # Ray routes on this: requests of one task go to the replica that already holds its prompt.
    return metadata + [("multiplexed_model_id", task)] if task else metadata


def _generate(channel: grpc.Channel, task: str, text: str, stream: bool, token: str = ADMIN) -> list[int]:
    stub = pb_grpc.InferenceStub(channel)
    request = pb.GenerateRequest(task=task, input=text, params=pb.DecodingParameters(max_new_tokens=NEW_TOKENS))
    if stream:
        return [t for m in stub.GenerateStream(request, metadata=_metadata(token, task), timeout=60)
                for t in m.token_ids]
    return list(stub.Generate(request, metadata=_metadata(token, task), timeout=60).token_ids)


@pytest.fixture(scope="module")
def expected(tiny_base) -> dict[tuple[str, str], list[int]]:
    hidden = tiny_base.spec.hidden_size
    prompts = {"": None, **{task: _prompt(task, hidden) for task in SEEDS}}
    return {(task, text): expected_ids(tiny_base, prompt, text, NEW_TOKENS)
            for task, prompt in prompts.items() for text in TEXTS}


def _mixed(channel: grpc.Channel, keys: list[tuple[str, str]]) -> dict[tuple[str, str, bool], list[int]]:
    calls = [(task, text, stream) for task, text in keys for stream in (False, True)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: _generate(channel, *c), calls))
    return dict(zip(calls, results))


def test_mixed_tasks_through_the_ingress_equal_the_reference(channel, expected):
    got = _mixed(channel, list(expected))
    assert got == {(t, x, s): expected[t, x] for t, x, s in got}


def test_tokens_are_checked_by_the_replicas(channel, expected):
    stub = pb_grpc.InferenceStub(channel)
    request = pb.GenerateRequest(task="beta", input="hello")
    with pytest.raises(grpc.RpcError) as missing:
        stub.Generate(request, timeout=60)
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as outside:
        stub.Generate(request, metadata=_metadata(INFER_ALPHA, "beta"), timeout=60)
    assert outside.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "alpha" in outside.value.details()
    assert _generate(channel, "alpha", "hello", stream=True, token=INFER_ALPHA) == expected["alpha", "hello"]
    registry = pb_grpc.RegistryStub(channel)
    with pytest.raises(grpc.RpcError) as admin_only:
        registry.SetAlias(pb.SetAliasRequest(name="alpha", alias="prod", version=1),
                          metadata=_metadata(INFER_ALPHA), timeout=60)
    assert admin_only.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A list answer is cut down to the token's tasks, as on a plain server.
    listed = registry.ListPrompts(pb.ListPromptsRequest(), metadata=_metadata(INFER_ALPHA), timeout=60)
    assert {p.name for p in listed.prompts} == {"alpha"}


def test_service_errors_keep_their_status_codes(channel):
    stub = pb_grpc.InferenceStub(channel)
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Generate(pb.GenerateRequest(task="nosuchtask", input="hello"),
                      metadata=_metadata(ADMIN, "nosuchtask"), timeout=60)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as streamed:
        list(stub.GenerateStream(pb.GenerateRequest(task="alpha", input="hello",
                                                    params=pb.DecodingParameters(max_new_tokens=10_000)),
                                 metadata=_metadata(ADMIN, "alpha"), timeout=60))
    assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_http_api_is_served_through_rays_http_proxy(ingress, channel):
    import httpx

    body = {"model": "alpha", "prompt": "hello", "max_tokens": NEW_TOKENS, "temperature": 0}
    url = f"{ingress[1]}/v1/completions"
    answer = httpx.post(url, json=body, headers={"authorization": f"Bearer {ADMIN}",
                                                 "serve_multiplexed_model_id": "alpha"}, timeout=60)
    assert answer.status_code == 200, answer.text
    request = pb.GenerateRequest(task="alpha", input="hello", params=pb.DecodingParameters(max_new_tokens=NEW_TOKENS))
    same = pb_grpc.InferenceStub(channel).Generate(request, metadata=_metadata(ADMIN, "alpha"), timeout=60)
    assert answer.json()["choices"][0]["text"] == same.text
    assert httpx.post(url, json=body, timeout=60).status_code == 401  # the same tokens guard HTTP


def _open_stream(channel: grpc.Channel, task: str, text: str) -> tuple[list[int], Iterator[pb.GenerateStreamResponse]]:
    """A long stream, started: its first tokens and the rest of it."""
    request = pb.GenerateRequest(task=task, input=text, params=pb.DecodingParameters(max_new_tokens=LONG))
    stream = pb_grpc.InferenceStub(channel).GenerateStream(request, metadata=_metadata(ADMIN, task), timeout=120)
    return list(next(stream).token_ids), stream


def test_a_killed_replica_is_replaced_and_later_requests_succeed(channel, expected):
    wait_until(lambda: _running_replicas() == 2 and len(_replica_names()) == 2, "two running replicas")
    victim = sorted(_replica_names())[0]
    keys = [(task, TEXTS[0]) for task in ("", *SEEDS)] * 2
    with ThreadPoolExecutor(len(keys)) as pool:
        opened = list(pool.map(lambda key: _open_stream(channel, *key), keys))
    # Every stream has started (sent its first tokens); at LONG tokens most still run when the replica dies.
    ray.kill(ray.get_actor(victim, namespace="serve"))
    for (first, stream), key in zip(opened, keys):
        try:
            tokens = first + [t for m in stream for t in m.token_ids]
        except grpc.RpcError as exc:  # the killed replica's streams end with a status, none hangs
            assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), exc
        else:  # the survivor's streams finish right (greedy: the short reference is a prefix)
            assert tokens[:len(expected[key])] == expected[key]
    # New requests go to the survivor at once (Ray's router drops a replica whose actor died), before Ray
    # has replaced it; then again once the replacement runs.
    got = _mixed(channel, list(expected))
    assert got == {(t, x, s): expected[t, x] for t, x, s in got}
    wait_until(lambda: _running_replicas() == 2 and victim not in _replica_names() and len(_replica_names()) == 2,
               "Ray to replace the killed replica", timeout_s=120, poll_s=0.2)
    got = _mixed(channel, list(expected))
    assert got == {(t, x, s): expected[t, x] for t, x, s in got}


def test_the_config_file_is_a_valid_serve_config_and_builds():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).parent.parent / "deploy" / "ray" / "serve_config.yaml"
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert config.grpc_options.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS
    (app,) = config.applications
    assert app.import_path == "softprompt.server.app.ray_serve:build"
    assert isinstance(build(app.args), serve.Application)
    with pytest.raises(ValueError, match="unknown softprompt flags"):
        build({"flags": ["--no-such-flag"]})
    with pytest.raises(ValueError, match="terminate TLS"):
        build({"flags": ["--tls-cert=c.pem", "--tls-key=k.pem"]})


# ---------------------------------------------------------------- where the proxies listen


def _this_machines_address() -> str | None:
    """A non-loopback address of this machine (None if it has none): a caller from it is not on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the interface a route would use
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def test_the_listeners_are_read_from_serves_config(ingress):
    grpc_port = int(ingress[0].rsplit(":", 1)[1])
    http_port = int(ingress[1].rsplit(":", 1)[1])
    assert proxy_listeners() == ProxyListeners("127.0.0.1", http_port, grpc_port)


def test_grpc_is_held_to_the_http_hosts_scope(ingress, channel, expected):
    """Ray binds its gRPC proxy on every interface; with http_options.host 127.0.0.1 a caller from another
    address of this machine is refused, saying why, while loopback callers are served."""
    address = _this_machines_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    port = ingress[0].rsplit(":", 1)[1]
    with grpc.insecure_channel(f"{address}:{port}") as outside:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.InferenceStub(outside).Generate(pb.GenerateRequest(task="alpha", input="hello"),
                                                    metadata=_metadata(ADMIN, "alpha"), timeout=60)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "this machine only (http_options.host 127.0.0.1)" in refused.value.details()
    assert _generate(channel, "alpha", "hello", stream=False) == expected["alpha", "hello"]


@pytest.mark.parametrize(("peer", "allowed"), [
    ("ipv4:127.0.0.1:5000", True), ("ipv6:[::1]:5000", True), ("unix:/tmp/s", True),
    ("ipv4:10.0.0.5:5000", False), ("ipv6:[2001:db8::1]:5000", False), ("", False),
])
def test_a_loopback_host_answers_loopback_callers_only(peer, allowed):
    assert ProxyListeners("127.0.0.1", 8000, 9000).allows(peer) is allowed
    assert ProxyListeners("0.0.0.0", 8000, 9000).allows(peer)  # the config opens it to every caller


def test_a_reachable_listener_without_tokens_is_warned_about():
    open_to_all = ProxyListeners("0.0.0.0", 8000, 9000)
    warning = open_to_all.exposure(tokens=False)
    assert warning is not None and "0.0.0.0:8000" in warning and "port 9000 of every interface" in warning
    assert "--auth-tokens" in warning
    assert "gRPC" not in (ProxyListeners("0.0.0.0", 8000, None).exposure(tokens=False) or "")
    assert open_to_all.exposure(tokens=True) is None
    assert ProxyListeners("127.0.0.1", 8000, 9000).exposure(tokens=False) is None  # this machine only
