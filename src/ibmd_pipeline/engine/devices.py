"""Devices, CPU threads and how networks run there: the one place that decides where tensors live.

Nothing here runs at import time; callers pick the device once (``engine.device`` in
``conf/base/parameters.yml``) and pass it down. Defaults are one CPU process. Both trainers
place networks (:func:`place_module`: device and memory format), copy batches from host
memory (:func:`stage_on_host`, :func:`gather_to_device`) and compile
(:func:`compile_module`) only through the helpers here, so each decision is made once.
:class:`EngineConfig` is the ``params:engine`` block that names the device and the CPU threads.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from ibmd_pipeline.engine.config import ConfigError, require

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


@dataclass(frozen=True)
class EngineConfig:
    """Where the work runs (``params:engine``, shared by every pipeline).

    device: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    num_threads: torch's CPU threads; 0 = one per available core.
    """

    device: str = "auto"
    num_threads: int = 0

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(self.num_threads >= 0, f"{prefix}num_threads", f"must be >= 0, got {self.num_threads}")
        select_device(self.device, key=f"{prefix}device")  # an unknown or absent device fails here


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


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what :mod:`platform` knows."""
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
        return f"cpu ({torch.get_num_threads()} threads, {cpu_model()})"
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


# --------------------------------------------------------------------------- memory format


def uses_channels_last(device: torch.device | str) -> bool:
    """Whether networks on ``device`` run in ``channels_last`` (NHWC) memory format: CUDA only.

    On CUDA, cuDNN's NHWC convolution kernels are the ones that use tensor cores under bf16
    autocast. On the CPU the UNet was measured slower in NHWC (``networks/unet.py``), so the
    default contiguous (NCHW) format stays there.
    """
    return torch.device(device).type == "cuda"


def place_module(
    module: nn.Module, device: torch.device | str, *, channels_last: bool | None = None
) -> nn.Module:
    """Move ``module`` to ``device`` in place and give its 4-d weights the device's memory format.

    channels_last: None = :func:`uses_channels_last` decides; True/False force it (tests,
    measurements). Convolutions pick NHWC when their weight is NHWC, so inputs need no
    conversion: the first convolution's output is NHWC and the format follows through the
    network. State dicts keep their keys and values (only the strides differ), so weights load
    into a model of either format. Returns ``module``.
    """
    device = torch.device(device)
    module.to(device)
    if uses_channels_last(device) if channels_last is None else channels_last:
        module.to(memory_format=torch.channels_last)
    return module


# --------------------------------------------------------------------------- host -> device


def pins_host_memory(device: torch.device | str) -> bool:
    """Whether host tensors that feed ``device`` are kept in pinned (page-locked) memory: CUDA only.

    Pinned memory lets the copy to the GPU run as an asynchronous DMA (``non_blocking=True``)
    instead of a synchronous copy through a driver staging buffer; for the CPU there is nothing
    to copy.
    """
    return torch.device(device).type == "cuda"


def stage_on_host(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` (on the CPU) ready for repeated batch copies to ``device``.

    Pinned once, as a copy, when :func:`pins_host_memory` says so; otherwise ``tensor`` itself
    (nothing is copied or changed on the CPU).
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"stage_on_host takes a CPU tensor, got one on {tensor.device}")
    if pins_host_memory(device) and not tensor.is_pinned():
        return tensor.pin_memory()
    return tensor


def gather_to_device(source: Tensor, indices: Tensor, device: torch.device | str) -> Tensor:
    """Rows ``indices`` (dim 0) of the host tensor ``source`` as a tensor on ``device``.

    For a pinned ``source`` (:func:`stage_on_host` on CUDA) the rows are gathered into a fresh
    pinned buffer and copied with ``non_blocking=True``: the copy overlaps with the GPU work
    queued before it, and torch's caching host allocator does not hand the buffer out again
    until the copy that reads it has finished, so no synchronisation is needed here.
    Otherwise this is ``source[indices].to(device)``.
    """
    device = torch.device(device)
    if pins_host_memory(device) and source.is_pinned():
        batch = torch.empty(
            (indices.numel(), *source.shape[1:]), dtype=source.dtype, pin_memory=True
        )
        torch.index_select(source, 0, indices.to("cpu"), out=batch)
        return batch.to(device, non_blocking=True)
    return source[indices].to(device)


# --------------------------------------------------------------------------- torch.compile

#: ``torch.compile`` modes (inductor only) and the backends a training config may name.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class CompileConfig:
    """``torch.compile`` of the networks in the training forward passes (``<stage>.train.compile``).

    enabled: compile (off by default: compiling takes minutes on a GPU and pays off on long
        runs only; on the CPU inductor needs a C++ compiler).
    mode: inductor's ``default``, ``reduce-overhead`` (CUDA graphs), ``max-autotune`` or
        ``max-autotune-no-cudagraphs``; other backends take ``default`` only.
    backend: ``inductor`` (generated kernels), or ``aot_eager`` / ``eager``, which trace the
        network but run PyTorch's own kernels (for tests and for debugging a compile problem).

    Compilation does not change what is computed (beyond floating-point rounding), so it is
    a resume-neutral setting: a run may be resumed with compile switched on or off.
    """

    enabled: bool = False
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    backend: Literal["inductor", "aot_eager", "eager"] = "inductor"

    def validate(self, key: str) -> None:
        prefix = f"{key}." if key else ""
        require(
            self.mode == "default" or self.backend == "inductor",
            f"{prefix}mode",
            f"mode {self.mode!r} is an inductor mode, but backend is {self.backend!r}; use mode "
            f"'default' with backends {', '.join(repr(b) for b in COMPILE_BACKENDS if b != 'inductor')}",
        )


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules was compiled in place (:func:`compile_module`)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def compile_module(module: nn.Module, config: CompileConfig) -> nn.Module:
    """Compile ``module`` in place (``nn.Module.compile``) when ``config.enabled``; returns it.

    In place, not ``torch.compile(module)``: the module keeps its class, parameters and
    ``state_dict`` keys (no ``_orig_mod.`` prefixes), so checkpoints, EMA updates and
    ``load_state_dict`` see the plain network and load into uncompiled models. Call it after
    :func:`place_module` (device and memory format are part of what is compiled) and after
    every deep copy of the module (EMA shadows, generator and auxiliary copies: a copy of a
    compiled module would call the original), and *before* wrapping it in DDP, which is how
    PyTorch recommends combining the two (compile the inner module, DDP around it). Each
    module keeps its own recompilation budget, so the several networks of a run do not
    exhaust one shared limit and fall back to eager.
    """
    if not config.enabled:
        return module
    options = {"mode": config.mode} if config.backend == "inductor" else {}
    module.compile(backend=config.backend, isolate_recompiles=True, **options)
    return module
