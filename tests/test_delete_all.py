"""`delete TASK --all` follows the rule of `delete TASK@N`: a task some alias points into is kept unless --force.

On the folder store and the S3 store (the rule is the registry's, above any store), through gRPC and the CLI.
"""

from __future__ import annotations

import pytest
import torch

from helpers import running_server
from softprompt.client import Client, FailedPreconditionError
from softprompt.client.cli import main
from softprompt.prompts.base import BaseModelSpec
from softprompt.prompts.errors import PromptNotFoundError, RegistryConflictError
from softprompt.prompts.format.tensor import PromptTensor
from softprompt.prompts.registry import Registry
from softprompt.prompts.registry.s3 import S3Store

HIDDEN = 16
SPEC = BaseModelSpec(model_id="tiny", hidden_size=HIDDEN, num_layers=2, num_attention_heads=4, vocab_size=64,
                     fingerprint="f" * 16)


def _prompt(seed: int) -> PromptTensor:
    return PromptTensor(torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(seed)), "PROMPT_TUNING")


@pytest.fixture(params=["folder", "s3"])
def registry(request, tmp_path) -> Registry:
    if request.param == "folder":
        return Registry(tmp_path / "store")
    endpoint, bucket = request.getfixturevalue("s3_endpoint_url"), request.getfixturevalue("s3_bucket")
    return Registry(store=S3Store(bucket, "prompts", endpoint_url=endpoint, cache_dir=tmp_path / "cache"))


def test_a_task_with_an_alias_is_kept_without_force(registry):
    registry.register("pirate", _prompt(1), SPEC)
    registry.register("pirate", _prompt(2), SPEC)
    registry.set_alias("pirate", "prod", 1)
    with pytest.raises(RegistryConflictError) as e:
        registry.delete("pirate", all_versions=True)
    assert "prod -> pirate@1" in str(e.value) and "force=True" in str(e.value)
    # Nothing went: neither the versions nor the alias.
    assert registry.resolve("pirate@prod").version == 1 and registry.resolve("pirate").version == 2
    assert registry.delete("pirate", all_versions=True, force=True) == ["pirate@1", "pirate@2"]
    with pytest.raises(PromptNotFoundError):
        registry.resolve("pirate")


def test_a_task_without_aliases_needs_no_force(registry):
    registry.register("pirate", _prompt(1), SPEC)
    assert registry.delete("pirate", all_versions=True) == ["pirate@1"]


def test_grpc_and_cli_refuse_the_same_way(tiny_base, tmp_path, capsys):
    with running_server(tiny_base, tmp_path / "store") as (_, address), Client(address, timeout=60) as client:
        client.register("pirate", torch.zeros(2, tiny_base.spec.hidden_size))
        client.set_alias("pirate", "prod", 1)
        with pytest.raises(FailedPreconditionError, match="prod -> pirate@1"):
            client.delete_prompt("pirate", all_versions=True)
        assert main(["--server", address, "delete", "pirate", "--all"]) == 1
        out, err = capsys.readouterr()
        assert out == "" and "FAILED_PRECONDITION" in err and "--force" in err
        assert client.get_prompt("pirate@prod").version == 1  # still there
        assert main(["--server", address, "delete", "pirate", "--all", "--force"]) == 0
        assert capsys.readouterr().out == "deleted pirate@1\n"


def test_delete_help_states_the_rule(capsys):
    assert main(["delete", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--all" in text and "alias" in text and "also for --all" in text
