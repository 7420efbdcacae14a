"""ARCHITECTURE.md's dependency rules hold: `lint-imports` checks the contracts in pyproject.toml's
[tool.importlinter], importing each transport really leaves torch out of the process, and only the KV manager
takes blocks from the pool or gives them back."""

from __future__ import annotations

import ast
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


def _pool_block_calls(source: str) -> list[int]:
    """Lines of `source` that take or give back pool blocks: `<...>.pool.allocate(...)` or `<...>.pool.release(...)`
    (or a bare `pool.` receiver)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("allocate", "release")):
            continue
        receiver = node.func.value
        name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", None)
        if name == "pool":
            lines.append(node.lineno)
    return lines


def test_block_decisions_are_the_kv_managers_alone():
    """ARCHITECTURE.md: inside the core, only `kv_manager` takes blocks from the pool or gives them back; the
    scheduler and the engine ask it (`allocate_slots`, `park`, `free`)."""
    assert _pool_block_calls("x = self.pool.allocate(3)\nengine.pool.release(b)\npool.allocate(1)\n") == [1, 2, 3]
    elsewhere = {str(path.relative_to(ROOT)): lines for path in sorted((ROOT / "server").rglob("*.py"))
                 if path.name != "kv_manager.py" and (lines := _pool_block_calls(path.read_text()))}
    assert elsewhere == {}, f"pool blocks taken or given back outside core/kv_manager.py: {elsewhere}"
