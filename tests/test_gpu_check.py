"""The prepared GPU run must start: `scripts/gpu_check.sh --dry-run` runs every stage on this CPU in an environment
holding only the GPU image's packages plus the wheels `--prepare` brings.

The GPU machine has its own image (torch, transformers, peft, grpcio, protobuf, safetensors and their dependencies)
and no network; a module the run imports that needs anything else (fastapi, boto3, ...) fails there at import, once
the minutes of starting the machine are spent. `scripts/image_venv.py` builds such an environment by linking those
distributions from .venv; `--prepare wheels` downloads the rest, at install time (`make install`, so `make test`,
puts them in .gpu/wheels): the prepared wheels themselves are what is checked, and the test needs no network. The dry run is the GPU run's own command lines on tiny versions of its configs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "scripts/gpu_check.sh"


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs a command with `env` added, and without anything that could reach .venv's packages."""
    full = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # The GPU machine is offline: nothing in the run may reach the hub either.
    full.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **env)
    return subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def image_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a fresh environment holding only the GPU image's packages (the script checks that fastapi,
    uvicorn, pydantic, boto3, prometheus_client, grpc_health, pytest, ... are not importable there)."""
    env = tmp_path_factory.mktemp("image") / "env"
    done = _run([sys.executable, "scripts/image_venv.py", str(env)], ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return env / "bin" / "python"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """What --prepare puts in .gpu/: its wheels as it downloads them, and a tokenizer (the tiny model's, where the
    GPU run has the default model's: converting that takes half a minute and proves nothing here)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("assets")
    wheels = ROOT / ".gpu" / "wheels"
    assert (wheels / ".prepared").is_file(), "no prepared wheels in .gpu/wheels: run `make install` (it runs " \
        "scripts/gpu_check.sh --prepare wheels)"
    (folder / "wheels").symlink_to(wheels, target_is_directory=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder / "tokenizer")
    return folder


def test_every_stage_of_the_gpu_run_runs_on_the_image_alone(image_python: Path, assets: Path, tmp_path: Path):
    done = _run(["bash", SCRIPT, "--dry-run"], ROOT, PY=str(image_python), ASSETS=str(assets), OUT=str(tmp_path))
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:] + logs
    assert "tests collected" in (tmp_path / "tests.txt").read_text()
    for run in ("bench-1b", "llama-3.1-8b-b2", "llama-3.1-8b-b2-eager", "gemma-3-4b-b2", "gemma-3-4b-b2-eager"):
        assert (tmp_path / f"{run}.json").is_file(), run
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["llama-3.1-8b-b2.json", "gemma-3-4b-b2.json"]


def test_a_stray_import_of_the_http_stack_would_fail_there(image_python: Path):
    """What makes the check above catch a top-level `import fastapi` (or uvicorn, boto3, ...) added to any module
    the run imports: the environment has none of them, though .venv, which it links from, has them all."""
    for module in ("fastapi", "uvicorn", "sse_starlette", "pydantic", "boto3", "prometheus_client"):
        done = _run([str(image_python), "-c", f"import {module}"], ROOT)
        assert f"No module named '{module}'" in done.stderr, module
