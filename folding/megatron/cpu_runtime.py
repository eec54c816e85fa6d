"""Run Megatron-Core's GPT + MoE code on CPU with gloo: an opt-in, scoped switch.

Megatron-Core assumes CUDA in a few dozen places that have nothing to do with the arithmetic:
buffers allocated on ``torch.cuda.current_device()`` or ``device="cuda"``, CUDA streams and
events, the CUDA RNG tracker, type-string checks, and two collectives that NCCL accepts and gloo
does not (uneven all-gather and reduce-scatter). ``cpu_runtime()`` maps those onto the CPU for
as long as it is active and undoes everything on exit:

* a ``TorchFunctionMode`` rewrites every CUDA device argument (``"cuda"``, ``"cuda:N"``, an int
  index, ``torch.device("cuda")``) to the CPU and makes ``Tensor.cuda()`` and ``pin_memory()``
  identities;
* ``torch.cuda`` streams, events and synchronisation become no-ops, ``current_device()`` answers
  the CPU device, and the CUDA RNG is the CPU default generator, which is what CPU kernels draw
  from;
* a handful of Megatron functions get CPU-correct replacements, listed in ``_megatron_patches``;
* with ``training=True``, Megatron's training package (``megatron.training``: its start-up, its
  memory reports, its dataset helpers) gets the stand-ins of ``cpu_training_patches`` too.

Nothing here changes a floating-point operation: the same kernels run, on the CPU. Where CUDA is
available the switch does nothing, unless the rank was launched for the CPU (``--device cpu``, or
``auto`` with fewer GPUs than ranks: see ``folding.run.device``); while it is on,
``torch.cuda.is_available()`` answers False, so that the rank sees the machine a CPU-only host
shows and builds the same model.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

_DEVICE_KWARGS = ("device",)


def _is_cuda_device(d: Any) -> bool:
    if isinstance(d, bool):
        return False
    if isinstance(d, int):
        return True  # a bare index means a CUDA device
    if isinstance(d, str):
        return d.startswith("cuda")
    if isinstance(d, torch.device):
        return d.type == "cuda"
    return False


_CPU = torch.device("cpu")


class CudaToCpuMode(TorchFunctionMode):
    """Send every tensor that Megatron asks to put on a CUDA device to the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.record_stream:
            return None
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: every method does nothing and returns another
    stand-in, so chains such as ``stream.record_event().synchronize()`` work."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name: str) -> Callable:
        return lambda *args, **kwargs: _NoOpStream()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@contextlib.contextmanager
def _no_op_stream_context(*args, **kwargs):
    yield


class _Patcher:
    """Set attributes and remember the old values, to restore them in reverse order."""

    def __init__(self):
        self._undo: List[Tuple[Any, str, Any, bool]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        existed = hasattr(owner, name)
        self._undo.append((owner, name, getattr(owner, name, None), existed))
        setattr(owner, name, value)

    def set_in_module(self, module_name: str, name: str, value: Any, only_if_missing=False) -> None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return
        if only_if_missing and getattr(module, name, None) is not None:
            return
        self.set(module, name, value)

    def restore(self) -> None:
        for owner, name, old, existed in reversed(self._undo):
            if existed:
                setattr(owner, name, old)
            else:
                delattr(owner, name)
        self._undo.clear()


def _cuda_shims(p: _Patcher) -> None:
    cuda = torch.cuda
    # The CPU device itself, not an index: allocations inside autograd backward functions run
    # where the function mode is not active, and an index there would mean an accelerator.
    p.set(cuda, "current_device", lambda: _CPU)
    # On a GPU host launched for the CPU, the model's configuration and layer spec must be
    # those of a CPU-only host (CPU initialisation, no Transformer Engine, no grouped GEMM).
    p.set(cuda, "is_available", lambda: False)
    p.set(cuda, "device_count", lambda: 0)
    p.set(cuda, "set_device", lambda *a, **k: None)
    p.set(cuda, "synchronize", lambda *a, **k: None)
    p.set(cuda, "empty_cache", lambda *a, **k: None)
    p.set(cuda, "Stream", _NoOpStream)
    p.set(cuda, "Event", _NoOpStream)
    p.set(cuda, "current_stream", lambda *a, **k: _NoOpStream())
    p.set(cuda, "default_stream", lambda *a, **k: _NoOpStream())
    p.set(cuda, "stream", _no_op_stream_context)
    p.set(cuda, "nvtx", _NoOpStream())
    # No CUDA graph is ever being captured (Megatron's router tracer asks before recording).
    p.set(cuda, "is_current_stream_capturing", lambda: False)
    p.set(cuda, "memory_allocated", lambda *a, **k: 0)
    p.set(cuda, "max_memory_allocated", lambda *a, **k: 0)
    # The CUDA generator's role on CPU is played by the CPU default generator: it is the one
    # CPU kernels (dropout, init) draw from.
    p.set(cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    p.set(cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    # torch.manual_seed itself calls torch.cuda.manual_seed_all, so seed the generator directly.
    p.set(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)))


def _megatron_patches(p: _Patcher) -> None:
    """CPU-correct replacements for the Megatron functions that cannot run as they are."""
    from folding.megatron import cpu_patches as mp

    mp.apply(p)


_active: Optional[Tuple[_Patcher, CudaToCpuMode]] = None


def cuda_present() -> bool:
    return torch.cuda.is_available()


def runtime_wanted(requested: str, cuda_available: bool) -> bool:
    """Whether the CPU runtime takes over: always for a rank launched for the CPU, never for
    one launched for a GPU, and otherwise (``requested`` empty) only where CUDA is absent."""
    if requested == "cpu":
        return True
    if requested == "cuda":
        return False
    return not cuda_available


def enable(training: bool = False) -> bool:
    """Switch the CPU runtime on for the rest of the process (until ``disable``); with
    ``training``, for Megatron's training loop (``megatron.training``) too.

    Returns False, and does nothing, when the runtime is already on, or when ``runtime_wanted``
    says no for the device this rank was launched for (``folding.run.device.DEVICE_ENV``).
    """
    from folding.run.device import requested_in_rank

    global _active
    if _active is not None or not runtime_wanted(requested_in_rank(), cuda_present()):
        return False
    patcher = _Patcher()
    try:
        _cuda_shims(patcher)
        if training:
            from folding.megatron import cpu_training_patches

            cpu_training_patches.apply(patcher)
        _megatron_patches(patcher)
    except BaseException:
        patcher.restore()
        raise
    mode = CudaToCpuMode()
    mode.__enter__()
    _active = (patcher, mode)
    return True


def disable() -> None:
    global _active
    if _active is None:
        return
    patcher, mode = _active
    mode.__exit__(None, None, None)
    patcher.restore()
    _active = None


def is_enabled() -> bool:
    return _active is not None


@contextlib.contextmanager
def cpu_runtime(training: bool = False) -> Iterator[bool]:
    """``with cpu_runtime():`` Megatron runs on CPU inside the block; yields whether it is on.
    ``training=True`` covers Megatron's training loop as well."""
    started = enable(training)
    try:
        yield is_enabled()
    finally:
        if started:
            disable()
