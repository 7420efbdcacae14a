"""`--kv-cache-memory`: the KV pool's budget as written (a size, a fraction of free device memory, "auto").

Torch-free, since `ServerConfig` validates the flag with it; resolving it to bytes reads the device's free
memory once the weights are loaded (`server/app/kv_budget.py`), just before the engine sizes its pool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

AUTO = "auto"

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[a-z]*)")
_EXPECTED = ("'auto', a size such as 24GiB, 512MiB, 2GB, 1.5GiB or 1073741824 (bytes), or a fraction in (0, 1] "
             "of the device memory free after the weights are loaded, such as 0.8")


@dataclass(frozen=True)
class KvCacheMemory:
    """A KV cache budget as given: `bytes`, a `fraction` of free device memory, or neither for "auto"."""

    bytes: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if self.bytes is not None and self.fraction is not None:
            raise ValueError("a KV cache budget is a size or a fraction, not both")


# What "auto" means. On a GPU, the memory left after the pool is what activations and the prompt and
# prefix caches grow into; host memory is shared with everything else on the machine, so a fixed size.
AUTO_CUDA = KvCacheMemory(fraction=0.8)
AUTO_CPU = KvCacheMemory(bytes=2 << 30)


def parse_kv_cache_memory(text: str) -> KvCacheMemory:
    """Parses a `--kv-cache-memory` value; raises ValueError naming what is accepted.

    A number with a unit (KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB of 1000, case-insensitive) or
    a whole number is a size in bytes; a number with a decimal point and no unit is a fraction.
    """
    value = text.strip().lower()
    if value == AUTO:
        return KvCacheMemory()
    match = _SIZE.fullmatch(value)
    if match is None or match["unit"] not in _UNITS:
        raise ValueError(f"kv_cache_memory must be {_EXPECTED}; got {text!r}")
    number, unit = match["number"], match["unit"]
    if not unit and "." in number:
        fraction = float(number)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"kv_cache_memory as a fraction must be within (0, 1], got {text!r}; a size needs a "
                             "unit (e.g. 1.5GiB) or whole bytes")
        return KvCacheMemory(fraction=fraction)
    size = int(float(number) * _UNITS[unit]) if "." in number else int(number) * _UNITS[unit]
    if size < 1:
        raise ValueError(f"kv_cache_memory must be more than 0 bytes, got {text!r}")
    return KvCacheMemory(bytes=size)
