"""The CPU decode kernel's build survives a builder killed halfway: the next process builds and loads it.

torch's own extension loader leaves a lock file behind when its builder dies, and every later load waits on
it forever; a server stopped while it builds must not hang every later server on the machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from softprompt.server.core import paged_attention

BUILD = """
import sys
from pathlib import Path
from softprompt.server.core import paged_attention
module = paged_attention._load_or_build(Path(sys.argv[1]))
print(module.__file__)
"""


@pytest.mark.skipif(paged_attention.load_kernel() is None, reason="no C++ compiler for torch extensions here")
def test_a_builder_killed_midway_does_not_block_the_next(tmp_path: Path) -> None:
    folder = tmp_path / "kernels" / "paged-attention"
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")  # what torch's loader leaves behind when its builder is killed
    first = subprocess.Popen([sys.executable, "-c", BUILD, str(folder)], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(folder.glob("build-*")):
        assert first.poll() is None, "the first builder exited before it began building"
        assert time.monotonic() < deadline, "the first builder never began building"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the compiler it started dies with it
    first.wait()

    second = subprocess.run([sys.executable, "-c", BUILD, str(folder)], capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    library = folder / "softprompt_paged_attention.so"
    assert library.is_file() and not any(folder.glob("build-*")), "the build was not published, or left scratch"
    third = subprocess.run([sys.executable, "-c", BUILD, str(folder)], capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and third.stdout.strip() == str(library), third.stderr[-2000:]
