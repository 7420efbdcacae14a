"""One OpenMP thread pool at a time, so the scheduler's worker thread keeps the model's cores busy.

torch's CPU kernels run in GNU OpenMP (libgomp) parallel regions, and libgomp gives every thread that starts a
region a pool of helper threads of its own, kept until that thread exits. Between regions a helper spins a few
milliseconds before it sleeps, but only while libgomp manages no more threads than the process may use CPUs;
past that it throttles every helper to ~100 spins, so each of a forward's hundreds of parallel regions waits for
a futex wake-up. The server builds its model on one thread (loading, weight packing, the startup probe) and serves
it on another, the scheduler's worker: two pools, and the worker's throttled. On this project's 2-core machine a
16-row decode step of the default model took 72 ms on the worker thread against 56-62 ms on the thread that built
the model, and 59-67 ms on the worker once the builder's pool was gone (BENCHMARKS.md).

`release_pool()` frees the calling thread's pool (OpenMP 5's `omp_pause_resource_all`): a thread done with torch
work that stays alive (the main thread after building the app, a transport thread after admission) calls it. A
later parallel region on that thread builds a new pool; nothing breaks, the worker only slows down until the next
release. Where torch does not use libgomp (another OpenMP, or none), it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_OMP_PAUSE_HARD = 2  # omp_pause_resource_t: free the calling thread's pool (libgomp: gomp_free_thread)
_lock = threading.Lock()
_pause: object | None = None
_looked = False


def _pause_function() -> object | None:
    """libgomp's `omp_pause_resource_all`, from the copy torch loaded; None where there is none."""
    global _pause, _looked
    with _lock:
        if not _looked:
            _looked = True
            for name in (str(Path(torch.__file__).parent / "lib" / "libgomp.so.1"), "libgomp.so.1"):
                try:
                    # RTLD_NOLOAD: only a libgomp already in the process (the one torch's kernels use).
                    lib = ctypes.CDLL(name, mode=getattr(ctypes, "RTLD_GLOBAL", 0) | 4)
                except OSError:
                    continue
                function = getattr(lib, "omp_pause_resource_all", None)
                if function is not None:
                    function.argtypes = [ctypes.c_int]
                    function.restype = ctypes.c_int
                    _pause = function
                    break
        return _pause


def release_pool() -> bool:
    """Frees the calling thread's OpenMP helper threads; True if libgomp took the request."""
    pause = _pause_function()
    if pause is None:
        return False
    return pause(_OMP_PAUSE_HARD) == 0  # type: ignore[operator]
