"""The committed stubs are what the proto generates, and the client side imports without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_are_fresh():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_generated_stubs_support_the_oldest_grpcio():
    text = (ROOT / "protos" / "softprompt_pb2_grpc.py").read_text()
    assert "GRPC_GENERATED_VERSION = '1.84.0'" in text, "regenerate with grpcio-tools==1.84.0 (pyproject's dev extra)"
