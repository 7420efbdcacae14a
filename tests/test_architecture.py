"""ARCHITECTURE.md's dependency rules hold: `lint-imports` checks the contracts in pyproject.toml's
[tool.importlinter], and importing each transport really leaves torch out of the process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRANSPORTS = ("softprompt.server.grpc_api.servicers", "softprompt.server.grpc_api.interceptors.auth",
              "softprompt.server.http_api.app", "softprompt.server.http_api.server")


def test_the_import_contracts_hold():
    lint_imports = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    if lint_imports is None:
        pytest.fail("lint-imports is missing: install the test extra (pip install -e '.[test]')")
    # No cache: a stale one could hide an import added since.
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"an import breaks ARCHITECTURE.md's rules:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("module", TRANSPORTS)
def test_a_transport_imports_no_tensor_library(module):
    """What the contracts cannot see (an import made by importlib, a plugin's own imports) shows at run time."""
    check = (f"import sys, {module}; "
             "print(sorted(m for m in ('torch', 'transformers', 'safetensors', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing {module} imports {result.stdout.strip()}"
