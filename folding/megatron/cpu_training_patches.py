"""What Megatron's training package (``megatron.training``) needs on top of the core's CPU
runtime, each with the reason. ``apply(patcher)`` installs them; ``cpu_runtime(training=True)``
calls it and the patcher restores everything when the runtime stops.

Nothing here changes arithmetic: it answers questions about a GPU that is not there (device
properties, memory counters) and skips set-up that only a GPU or a source checkout needs.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import types
import typing


class _CpuDeviceProperties(types.SimpleNamespace):
    """What ``torch.cuda.get_device_properties`` answers: no compute capability, so every
    Hopper- or Blackwell-only path stays off."""


def _device_properties(*args, **kwargs):
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 0
    return _CpuDeviceProperties(name="cpu", major=0, minor=0, total_memory=total,
                                multi_processor_count=os.cpu_count() or 1)


def _memory_stats(*args, **kwargs):
    return {}


def _zero(*args, **kwargs):
    return 0


def _nothing(*args, **kwargs):
    return None


def _without_cuda_assert(original):
    """``initialize_megatron`` asserts CUDA unless told ``allow_no_cuda``; everything else it
    does (groups, seeds, timers) runs as it is."""

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    return initialize_megatron


def _compile_helpers_if_missing(original):
    """Rank 0 runs ``make`` on the dataset helpers at start-up. The wheel ships them compiled
    and without a Makefile, so ``make`` fails there; a source checkout still compiles."""

    @functools.wraps(original)
    def compile_helpers():
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            return original()
        return None

    return compile_helpers


def apply(p) -> None:
    import torch

    cuda = torch.cuda
    # One "device" per rank: initialize_megatron builds the model-parallel groups only when it
    # counts a device.
    p.set(cuda, "device_count", lambda: 1)
    p.set(cuda, "get_device_properties", _device_properties)
    p.set(cuda, "get_device_capability", lambda *a, **k: (0, 0))
    p.set(cuda, "get_device_name", lambda *a, **k: "cpu")
    # Memory reports: no device memory is used.
    for name in ("memory_reserved", "max_memory_reserved"):
        p.set(cuda, name, _zero)
    p.set(cuda, "reset_peak_memory_stats", _nothing)
    p.set(cuda, "memory_stats", _memory_stats)
    # Python 3.11: megatron.training marks methods with Python 3.12's typing.override, a
    # decorator that only marks.
    if sys.version_info < (3, 12):
        p.set(typing, "override", lambda f: f)
    for module in ("megatron.training.initialize", "megatron.training.training"):
        p.set_in_module(module, "initialize_megatron",
                        _without_cuda_assert(importlib.import_module(module).initialize_megatron))
    # Start-up warms the fused bias-activation kernels up with torch.compile; Megatron's CPU flags
    # switch those fusions off, and Inductor would look for a GPU to compile for.
    p.set_in_module("megatron.training.initialize", "_warmup_jit_function", _nothing)
    p.set_in_module("megatron.core.datasets.utils", "compile_helpers",
                    _compile_helpers_if_missing(
                        importlib.import_module("megatron.core.datasets.utils").compile_helpers))
