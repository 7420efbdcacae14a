"""The `--kv-cache-memory` budget in bytes on the serving device: a size as given, or a fraction of the memory free
once the weights are loaded (`server/kv_memory.py` parses the flag, torch-free, for `ServerConfig`)."""

from __future__ import annotations

import os

import torch

from softprompt.server.kv_memory import AUTO_CPU, AUTO_CUDA, KvCacheMemory


def resolve_kv_cache_bytes(spec: KvCacheMemory, device: torch.device) -> int:
    """The budget in bytes on `device`: a size as is, a fraction of the memory free now.

    "auto" is AUTO_CUDA on CUDA and AUTO_CPU elsewhere. Free memory is the GPU's
    (`torch.cuda.mem_get_info`) on CUDA and the host's available physical memory otherwise.
    """
    if spec.bytes is not None:
        return spec.bytes
    if spec.fraction is not None:
        return int(_free_bytes(device) * spec.fraction)
    return resolve_kv_cache_bytes(AUTO_CUDA if device.type == "cuda" else AUTO_CPU, device)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
