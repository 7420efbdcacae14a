"""Decode attention that reads the block table: a CPU kernel over the pool's blocks in place, no gathered copy.

Without it, each decode step gathers every row's keys and values out of the pool into a padded copy per
layer (`PagedCache.update`) and runs SDPA over the copy. With it (`csrc/paged_attention.cpp`, built once
per machine with the compiler torch extensions use, cached under the model cache), a decode step's
`PagedCache.update` only writes the new token's keys and values, and the attention layers' SDPA call is
answered by the kernel, which walks each row's blocks itself and scores each KV head's whole group of
query heads at once (grouped-query heads are never expanded).

The kernel reaches the layers through transformers' attention registry: `install()` registers a wrapper
under "sdpa" that runs the kernel only inside `fused(cache)` (the engine's decode steps) and otherwise
calls transformers' own SDPA function unchanged, so the no-cache reference, training and every prefill
compute what they computed before. A layer call the kernel does not cover (extra attention arguments such as
soft-capping or sinks) gathers its keys and values and runs SDPA as before in a decode step, and raises
`NotCovered` in a ragged forward (prefill and decode rows as one row of queries), which has no padded
layout to gather into: the engine then runs that model's forwards padded.

The kernel sums in another order than SDPA (float32, vectorized), so logits differ in the last bits;
greedy outputs equal the gathered path's on the test suite's models (the 30-family matrix runs both).
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from softprompt.server.config import default_cache_dir

if TYPE_CHECKING:
    from softprompt.server.core.paged_cache import PagedCache

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
# Fast-math lets the compiler vectorize the dot products and call glibc's vector exp (libmvec), which the
# softmax spends most of its time in otherwise. Only the compile sees -ffast-math: passed to the link, GCC
# before 13 would add crtfastmath.o, which flushes denormals to zero for the whole process.
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
_LDFLAGS = ["-fopenmp", "-lmvec"]

_NAME = "softprompt_paged_attention"
_FUSED: contextvars.ContextVar[PagedCache | None] = contextvars.ContextVar("softprompt_fused_decode", default=None)
_lock = threading.Lock()
_kernel: ModuleType | None = None
_failed = False


class NotCovered(RuntimeError):
    """A layer of a ragged forward needs attention the kernel does not compute (soft-capping, sinks): a ragged
    forward has no padded layout to fall back to, so the engine runs its forwards padded from then on."""


def kernel_available(device: torch.device, dtype: torch.dtype, attn_implementation: str | None) -> bool:
    """Whether the kernel can serve this model: a CPU in float32, SDPA attention, and a build (made once)."""
    if device.type != "cpu" or dtype != torch.float32 or attn_implementation != "sdpa":
        return False
    return load_kernel() is not None


def load_kernel(cache_dir: Path | None = None) -> ModuleType | None:
    """The compiled kernel, built on first use (about 30 s on two cores) and then loaded from the cache;
    None (logged once) where it cannot be built: no compiler, no ninja."""
    global _kernel, _failed
    with _lock:
        if _kernel is not None or _failed:
            return _kernel
        try:
            _kernel = _load_or_build((cache_dir or _default_cache_dir()) / _build_key())
        except Exception as exc:  # noqa: BLE001 - the gathered path serves without it
            _failed = True
            log.warning("the CPU paged attention kernel could not be built (%s); decode steps gather keys and "
                        "values and run SDPA instead", exc)
        return _kernel


def _load_or_build(folder: Path) -> ModuleType:
    """Import the built kernel from `folder`, building it first if no process has.

    torch's `load` guards its build folder with a lock *file*: a process killed mid-build (a server stopped
    while it starts) leaves it behind, and every later load then waits on it forever. Here builders take a
    `flock` on the folder, which the OS releases when its holder dies however it dies, each build runs in a
    fresh scratch folder, and one rename publishes the finished library, so a reader never sees half of it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    library = folder / f"{_NAME}.so"
    with open(folder / "build.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():
            return _import(library)
        for stale in folder.glob("build-*"):  # left by a builder that died holding the lock we now hold
            shutil.rmtree(stale, ignore_errors=True)
        log.info("building the CPU paged attention kernel into %s (once per machine, ~30 s)", folder)
        from torch.utils.cpp_extension import load

        with tempfile.TemporaryDirectory(dir=folder, prefix="build-") as scratch:
            module = load(name=_NAME, sources=[str(SOURCE)], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                          build_directory=scratch, verbose=False)
            # The loaded library stays mapped after the rename; later processes import the published one.
            os.replace(Path(scratch) / f"{_NAME}.so", library)
        return module


def _import(library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_NAME, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _default_cache_dir() -> Path:
    return default_cache_dir() / "kernels"


def _build_key() -> str:
    """A build folder per source, torch release and processor: -march=native code runs only where it was built."""
    flags = ""
    with contextlib.suppress(OSError):
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_CFLAGS + _LDFLAGS).encode() + torch.__version__.encode()
                            + platform.machine().encode() + flags.encode()).hexdigest()
    return f"paged-attention-{digest[:16]}"


@contextlib.contextmanager
def fused(cache: PagedCache) -> Iterator[None]:
    """Attention layers answer SDPA calls with the kernel over `cache`'s rows inside this block (this thread)."""
    token = _FUSED.set(cache)
    try:
        yield
    finally:
        _FUSED.reset(token)


def install() -> None:
    """Registers the wrapper that answers transformers' "sdpa" attention calls (idempotent)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if getattr(AttentionInterface._global_mapping.get("sdpa"), "_softprompt", False):
        return

    def sdpa_or_paged(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = _FUSED.get()
        if cache is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        layer = int(getattr(module, "layer_idx"))
        if not cache.covers(query) or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks")) \
                or kwargs.get("dropout", 0.0):
            if cache.in_place is not None and cache.in_place.ragged:
                raise NotCovered(f"{type(module).__name__} calls attention with arguments the kernel does not "
                                 f"take ({sorted(k for k, v in kwargs.items() if v is not None)})")
            key, value = cache.gathered(layer)
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return cache.attend(layer, query, kwargs.get("scaling")), None

    sdpa_or_paged._softprompt = True  # type: ignore[attr-defined]
    AttentionInterface.register("sdpa", sdpa_or_paged)
