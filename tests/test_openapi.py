"""/openapi.json says what the server does: schemathesis (a property-based OpenAPI tester) runs against a live
server with all its checks, so the schema and the server cannot drift apart.

The run is bounded and repeatable: a fixed seed, a few examples per operation, one worker, no example
database; it takes seconds. Schemathesis checks, among others, that no request gets a 5xx, every status and
header is documented, every answer (and every server-sent event) matches its schema, a body the schema allows
is taken and one it forbids is refused, and, on the server with tokens, that a missing or wrong token is refused.

The tiny model gets room for long inputs (its config says 4096 positions): a body the schema allows may hold
a few hundred tokens, and "input too long for this model" is a 400 no schema can rule out beforehand.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from helpers import running_server
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.registry import Registry
from softprompt.server.access.tokens import Role, format_entry, hash_token

TOKEN = "schemathesis-admin-token"
RUN = ["--checks", "all", "--seed", "23", "--max-examples", "12", "--workers", "1", "--generation-database", "none",
       "--request-timeout", "60", "--no-color"]


@pytest.fixture(scope="module")
def roomy_base(tiny_model_dir, tmp_path_factory):
    """The tiny model, its config allowing 4096 positions (rotary: no weight depends on it)."""
    from softprompt.server.app.loading import load_base_model

    folder = tmp_path_factory.mktemp("roomy-model")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return load_base_model(str(folder), device="cpu")


def _store(base, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    registry = Registry(store)
    registry.register("poet", PromptTensor(torch.randn(4, base.spec.hidden_size) * 0.02, "RAW"), base.spec)
    registry.set_alias("poet", "prod", 1)
    return store


def _serve(base, store: Path, **settings):
    return running_server(base, store, http_port=0, max_new_tokens=8, default_max_new_tokens=2,
                          max_input_tokens=4000, **settings)


def _schemathesis(url: str, workdir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`schemathesis run` on the server's schema (in `workdir`, where it may leave files)."""
    command = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
               "run", f"{url}/openapi.json", *RUN, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=workdir)


def _summary(run: subprocess.CompletedProcess[str]) -> str:
    return run.stdout[-6000:] + run.stderr[-2000:]


def test_schemathesis_finds_nothing_on_an_open_server(roomy_base, tmp_path):
    with _serve(roomy_base, _store(roomy_base, tmp_path)) as (app, _):
        run = _schemathesis(f"http://127.0.0.1:{app.http_port}", tmp_path)
    assert run.returncode == 0, _summary(run)
    assert "5/5" in run.stdout  # every operation was tested


def test_schemathesis_finds_nothing_on_a_server_with_tokens(roomy_base, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(format_entry(hash_token(TOKEN), Role.ADMIN) + "\n")
    with _serve(roomy_base, _store(roomy_base, tmp_path), auth_tokens=tokens) as (app, _):
        run = _schemathesis(f"http://127.0.0.1:{app.http_port}", tmp_path, "--header", f"Authorization: Bearer {TOKEN}")
    assert run.returncode == 0, _summary(run)


def test_the_bearer_scheme_and_401_only_where_tokens_are_asked_for(roomy_base, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(format_entry(hash_token(TOKEN), Role.ADMIN) + "\n")
    store = _store(roomy_base, tmp_path)
    for auth, expected in ((None, False), (tokens, True)):
        with _serve(roomy_base, store, auth_tokens=auth) as (app, _):
            spec = httpx.get(f"http://127.0.0.1:{app.http_port}/openapi.json", timeout=30).json()
        operations = [op for methods in spec["paths"].values() for op in methods.values()]
        assert ("securitySchemes" in spec.get("components", {})) is expected
        assert all(("401" in op["responses"]) is expected and ("security" in op) is expected for op in operations)


def test_the_schema_states_what_admission_checks(roomy_base, tmp_path):
    """Limits only the running server knows, and the rules the service applies beyond the types."""
    with _serve(roomy_base, _store(roomy_base, tmp_path), max_labels=5, max_stop_sequences=3) as (app, _):
        spec = httpx.get(f"http://127.0.0.1:{app.http_port}/openapi.json", timeout=30).json()
    bodies = spec["components"]["schemas"]
    labels = bodies["ClassifyRequest"]["properties"]["labels"]
    assert labels["maxItems"] == 5 and labels["uniqueItems"] and labels["minItems"] == 2
    stop = {b.get("type"): b for b in bodies["CompletionRequest"]["properties"]["stop"]["anyOf"]}
    assert stop["string"]["minLength"] == 1 and stop["array"]["maxItems"] == 3
    assert {b.get("type"): b for b in bodies["CompletionRequest"]["properties"]["max_tokens"]["anyOf"]}[
        "integer"]["maximum"] == 8
    assert bodies["CompletionRequest"]["additionalProperties"] is False
