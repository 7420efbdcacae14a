"""Shared fixtures: a tiny real Llama model and tokenizer built from a config (helpers live in helpers.py).

The tiny model is a real transformers model saved to disk and loaded through the same code path
as any `--model` folder; only its size is small, so the whole suite runs offline on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import build_tiny_model_dir

# Test modules that start Ray run first. Ray starts its processes with fork (it passes a preexec_fn, so no
# vfork), which duplicates this process's address space; by the end of the suite the servers it has started
# and dropped leave tens of GB of untouched, reserved (virtual) memory, in adjacent mappings the kernel merges,
# and a fork charged for one such mapping larger than RAM fails with ENOMEM.
_FORKS_EARLY = ("test_ray_serve.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Moves the modules that start Ray to the front, keeping every other order."""
    items.sort(key=lambda item: item.path.name not in _FORKS_EARLY)

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model folder, built once per test session."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir: Path):
    """The tiny model loaded through softprompt's loader (CPU, float32)."""
    from softprompt.server.app.loading import load_base_model

    return load_base_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def s3_endpoint_url() -> Iterator[str]:
    """A real S3 HTTP endpoint (moto's server) on loopback for the session, with dummy credentials set."""
    from helpers import s3_endpoint

    with s3_endpoint() as url:
        yield url


@pytest.fixture
def s3_bucket(s3_endpoint_url: str) -> str:
    """A fresh, empty bucket on `s3_endpoint_url`."""
    from helpers import new_bucket

    return new_bucket(s3_endpoint_url)
