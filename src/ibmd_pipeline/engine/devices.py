"""Devices and CPU threads: the one place that decides where tensors live.

Nothing here runs at import time; callers pick the device once (``engine.device`` in
``conf/base/parameters.yml``) and pass it down. Defaults are one CPU process.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from pathlib import Path

import torch

from ibmd_pipeline.engine.config import ConfigError

_DEVICE_KEY = "engine.device"
_ALLOWED = "'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"


def select_device(preference: str = "auto", key: str = _DEVICE_KEY) -> torch.device:
    """The torch device for ``preference``: ``auto`` (CUDA when present, else CPU), ``cpu``,
    ``cuda``, ``cuda:N`` or ``mps``.

    Raises ConfigError naming ``key`` for an unknown name or a device this machine lacks.
    """
    if not isinstance(preference, str):
        raise ConfigError(key, f"expected a string, got {preference!r}; allowed values: {_ALLOWED}")
    name = preference.strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        if not torch.cuda.is_available():
            raise ConfigError(
                key, f"{preference!r} requested but CUDA is not available here; use 'auto' or 'cpu'"
            )
        if match.group(1) is None:
            return torch.device("cuda")
        index = int(match.group(1))
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(key, f"{preference!r} requested but this machine has {count} CUDA device(s)")
        return torch.device("cuda", index)
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(key, "'mps' requested but Apple MPS is not available here; use 'auto' or 'cpu'")
        return torch.device("mps")
    raise ConfigError(key, f"got {preference!r}; allowed values: {_ALLOWED}")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_threads(num_threads: int = 0, key: str = "engine.num_threads") -> int:
    """Set torch's intra-op CPU threads (0 = one per available core); returns the count set.

    Idempotent. The inter-op pool can only be sized before torch first uses it, so it is set
    (to the same count) only when still possible.
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise ConfigError(key, f"must be an integer >= 0 (0 = all available cores), got {num_threads!r}")
    count = num_threads or available_cores()
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    with contextlib.suppress(RuntimeError):  # already started: keep torch's own choice
        torch.set_num_interop_threads(count)
    return count


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(device: torch.device | str) -> str:
    """A one-line description for logs, e.g. ``cpu (2 threads, Intel Xeon ...)`` or
    ``cuda:0 (NVIDIA H100 80GB HBM3, 79.2 GiB)``."""
    device = torch.device(device)
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads, {_cpu_model()})"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    return str(device)


def autocast_context(
    device: torch.device | str, bf16: bool, *, allow_cpu: bool = False
) -> contextlib.AbstractContextManager[None]:
    """bfloat16 autocast for forward passes when ``bf16`` is set.

    On CUDA this is ``torch.autocast("cuda", torch.bfloat16)``. On the CPU it is a no-op
    unless ``allow_cpu`` is set too: CPU bfloat16 is usually slower than float32 on the
    processors we run on and only worth it on chips with AMX/AVX512-BF16. bfloat16 keeps
    float32's exponent range, so no loss scaling is needed (unlike float16).
    """
    device = torch.device(device)
    if bf16 and (device.type == "cuda" or (device.type == "cpu" and allow_cpu)):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
