"""A thread done with torch hands its OpenMP helper threads back (`core/omp.py`), so that the scheduler's worker is
the only thread with a pool and libgomp does not throttle its helpers. Counted in threads, never timed."""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

import torch

from helpers import torch_threads
from softprompt.server.core import omp


_NAME = "omp-probe"  # this test's thread's name (comm), which the OpenMP helpers it starts inherit


def _name_this_thread() -> None:
    ctypes.CDLL(None).prctl(15, _NAME.encode(), 0, 0, 0)  # PR_SET_NAME


def _threads() -> int:
    """Threads named as the test's: itself and its OpenMP helpers, whatever other threads the process runs."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            count += Path(f"/proc/self/task/{task}/comm").read_text().strip() == _NAME
        except OSError:  # a thread that ended while we looked
            pass
    return count


def test_a_thread_done_with_torch_hands_its_openmp_threads_back() -> None:
    assert (Path(torch.__file__).parent / "lib" / "libgomp.so.1").exists(), "torch's CPU wheel runs on GNU OpenMP"
    seen: dict[str, object] = {}

    def work() -> None:
        _name_this_thread()
        seen["before"] = _threads()
        (torch.ones(1 << 22) * 2).sum()  # far over the grain size: a parallel region, and this thread's pool
        seen["with_pool"] = _threads()
        seen["released"] = omp.release_pool()
        seen["after"] = _threads()
        (torch.ones(1 << 22) * 2).sum()  # a later region builds a new pool: nothing breaks
        seen["again"] = _threads()
        seen["released_again"] = omp.release_pool()

    with torch_threads(2):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    assert seen["released"] is True and seen["released_again"] is True
    assert seen["before"] == 1 and seen["with_pool"] == 2  # one helper beside the thread itself
    assert seen["after"] == seen["before"] and seen["again"] == seen["before"] + 1


def test_releasing_without_a_pool_changes_nothing() -> None:
    seen: dict[str, object] = {}

    def idle() -> None:
        _name_this_thread()
        before = _threads()
        seen["released"] = omp.release_pool()
        seen["same"] = _threads() == before

    thread = threading.Thread(target=idle)
    thread.start()
    thread.join()
    assert seen == {"released": True, "same": True}
