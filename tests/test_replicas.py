"""Replicas over one bucket behave as one service: two real `softprompt serve` processes on a real S3 endpoint.

Register through A, generate through B (the no-cache reference); move an alias through B, A follows within
`--store-refresh-s`; delete through A, B answers NOT_FOUND. And a store that cannot be reached at startup is a
clear message and a non-zero exit, before any model is loaded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import torch

from helpers import expected_ids, wait_until
from softprompt.client import Client
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.registry import Registry, open_store
from softprompt.client import errors as client_errors
from softprompt.server.app.serve_cli import main as serve_main

REFRESH_S = 1.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _serve(model_dir: Path, store: str, endpoint: str, log: Path) -> Iterator[str]:
    """A `softprompt serve` process on the tiny model and the shared store; yields its address once it answers."""
    port = _free_port()
    args = [sys.executable, "-m", "softprompt.client.cli", "serve", "--model", str(model_dir), "--port", str(port),
            "--http-port", "off", "--store", store, "--s3-endpoint-url", endpoint,
            "--store-refresh-s", str(REFRESH_S), "--batch-wait-ms", "1"]
    with log.open("w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the server exited ({process.returncode}):\n{log.read_text()}")
            try:
                with Client(address, timeout=5) as client:
                    client.model_info()
                break
            except client_errors.SoftpromptError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the server never answered:\n{log.read_text()}") from None
                time.sleep(0.2)
        yield address
    finally:
        process.terminate()
        process.wait(timeout=60)


def _prompt(base, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(4, base.spec.hidden_size) * base.model.get_input_embeddings().weight.std() * 4


def test_two_servers_on_one_bucket_behave_as_one(tiny_base, tiny_model_dir, s3_endpoint_url, s3_bucket, tmp_path):
    store = f"s3://{s3_bucket}/prompts"
    with ExitStack() as stack:
        a = stack.enter_context(_serve(tiny_model_dir, store, s3_endpoint_url, tmp_path / "a.log"))
        b = stack.enter_context(_serve(tiny_model_dir, store, s3_endpoint_url, tmp_path / "b.log"))
        with Client(a, timeout=60) as on_a, Client(b, timeout=60) as on_b:
            first = _prompt(tiny_base, 1)
            assert on_a.register("pirate", first).version == 1
            # Served by B at the very next request naming it: read through, no restart.
            result = on_b.generate("pirate@1", "hello", max_new_tokens=6)
            assert list(result.token_ids) == expected_ids(tiny_base, first, "hello", 6)
            assert on_b.generate("pirate", "hello", max_new_tokens=6).prompt_version == "pirate@1"

            on_a.register("pirate", _prompt(tiny_base, 2))
            on_b.set_alias("pirate", "prod", 2)
            seen = wait_until(lambda: on_a.generate("pirate@prod", "hi", max_new_tokens=1).prompt_version == "pirate@2",
                          "A sees the alias B set")
            assert seen <= 10 * REFRESH_S
            on_b.set_alias("pirate", "prod", 1)  # moved: A follows within the refresh bound
            wait_until(lambda: on_a.generate("pirate@prod", "hi", max_new_tokens=1).prompt_version == "pirate@1",
                   "A follows the alias B moved")

            on_a.delete_prompt("pirate@2")

            def gone_on_b() -> bool:
                try:
                    on_b.generate("pirate@2", "hi", max_new_tokens=1)
                except client_errors.NotFoundError:
                    return True
                return False

            wait_until(gone_on_b, "B answers NOT_FOUND for the version A deleted")
            wait_until(lambda: [p.version for p in on_b.list_prompts("pirate")] == [1], "B lists what A lists")
            assert [p.version for p in on_a.list_prompts("pirate")] == [1]


def test_an_unreachable_store_fails_the_start_with_a_clear_message(s3_endpoint_url, tmp_path):
    with pytest.raises(SystemExit, match=r"softprompt serve: .*s3://no-such-bucket"):
        serve_main(["--store", "s3://no-such-bucket/prompts", "--s3-endpoint-url", s3_endpoint_url,
                    "--cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"softprompt serve: .*s3://"):
        serve_main(["--store", "s3://some-bucket/prompts", "--s3-endpoint-url", f"http://127.0.0.1:{_free_port()}",
                    "--cache-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="gs://"):
        serve_main(["--store", "gs://bucket/prompts"])


def test_store_outage_while_serving(tiny_base, tmp_path):
    from helpers import new_bucket, running_server, s3_endpoint

    endpoint_cm = s3_endpoint()
    endpoint = endpoint_cm.__enter__()
    stopped = False
    try:
        store = f"s3://{new_bucket(endpoint)}/prompts"
        with running_server(tiny_base, store, s3_endpoint_url=endpoint, store_refresh_s=0.0,
                            cache_dir=tmp_path) as (_, address), Client(address, timeout=120) as client:
            prompt = _prompt(tiny_base, 3)
            client.register("pirate", prompt)
            assert client.generate("pirate", "hello", max_new_tokens=4).prompt_version == "pirate@1"
            # Another server registers a task this one never read.
            elsewhere = Registry(store=open_store(store, endpoint_url=endpoint))
            elsewhere.register("other", PromptTensor(_prompt(tiny_base, 4), "PROMPT_TUNING"), tiny_base.spec)
            endpoint_cm.__exit__(None, None, None)
            stopped = True
            # Cached: keeps serving, the same tokens.
            result = client.generate("pirate", "hello", max_new_tokens=4)
            assert list(result.token_ids) == expected_ids(tiny_base, prompt, "hello", 4)
            # Never read here: UNAVAILABLE, naming the store.
            with pytest.raises(client_errors.UnavailableError, match=r"s3://"):
                client.generate("other", "hello", max_new_tokens=4)
    finally:
        if not stopped:
            endpoint_cm.__exit__(None, None, None)
