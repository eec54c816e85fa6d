"""Count, on a CPU, the operations that would make the host wait for a GPU.

A host wait is what stalls the CPU until queued GPU work finishes: a blocking copy of device
data to the host (``.cpu()``, ``.tolist()``, ``.numpy()``, ``.item()``, ``int()``/``bool()``/
``float()`` of a tensor), an operation whose output size depends on device data (``nonzero``,
``masked_select``, ``unique``, boolean-mask indexing, ``repeat_interleave`` without an output
size, ``bincount``), and a blocking copy of host data to the device (a copy from pageable memory
synchronises the stream). Non-blocking device-to-host copies are counted apart (``deferred``):
they wait only where an event is synchronised, which Megatron's dispatcher and the folded one
both do once.

``count_host_waits()`` is a context manager. Inside it, tensors that would live on a GPU are
*marked*: every tensor created with a CUDA device argument (the CPU runtime then puts it on the
CPU), everything computed from a marked tensor, and whatever ``mark`` is given. Marked tensors
answer ``device`` with cuda and ``is_cuda`` with True, so code that branches on the device takes
its GPU path. The forward pass is counted at the level of torch functions; the backward pass,
which runs below them, is counted by the ATen operations it executes. The count is of calls made,
so it is the same on any machine: what a GPU adds is the time each wait costs.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_GPU = torch.device("cuda", 0)


class OnDevice(torch.Tensor):
    """A CPU tensor standing for one on a GPU."""

    @property
    def device(self):  # noqa: D401 - mirrors torch.Tensor.device
        return _GPU

    @property
    def is_cuda(self):
        return True


def _is_cuda(d) -> bool:
    if isinstance(d, bool):
        return False
    if isinstance(d, int):
        return True
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, torch.device) and d.type == "cuda"


def _is_cpu(d) -> bool:
    return (isinstance(d, str) and d == "cpu") or (isinstance(d, torch.device) and d.type == "cpu")


def _marked(x) -> bool:
    return isinstance(x, OnDevice)


def _any_marked(args, kwargs) -> bool:
    def scan(v):
        if _marked(v):
            return True
        if isinstance(v, (list, tuple)):
            return any(scan(i) for i in v)
        return False

    return any(scan(a) for a in args) or any(scan(v) for v in kwargs.values())


def mark(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor that stands for one on the GPU (same storage, same autograd)."""
    return t if _marked(t) else t.as_subclass(OnDevice)


def _unmark(out):
    if isinstance(out, OnDevice):
        return out.as_subclass(torch.Tensor)
    if isinstance(out, tuple):
        return tuple(_unmark(o) for o in out)
    if isinstance(out, list):
        return [_unmark(o) for o in out]
    return out


def _mark_all(out):
    if isinstance(out, torch.Tensor):
        return mark(out)
    if type(out) is tuple:  # not torch.Size or a named tuple
        return tuple(_mark_all(o) for o in out)
    if type(out) is list:
        return [_mark_all(o) for o in out]
    return out


_T = torch.Tensor
_TO_HOST = {_T.cpu, _T.numpy, _T.tolist, _T.item, _T.__bool__, _T.__int__, _T.__float__,
            _T.__index__}
_DATA_DEPENDENT = {torch.nonzero, _T.nonzero, torch.masked_select, _T.masked_select,
                   torch.unique, _T.unique, torch.unique_consecutive, _T.unique_consecutive,
                   torch.argwhere, _T.argwhere, torch.bincount, _T.bincount}
_BACKWARD_WAITS = {"nonzero", "masked_select", "_local_scalar_dense", "_unique2", "unique_dim",
                   "unique_consecutive", "bincount", "repeat_interleave"}


def _kind_of(func, args, kwargs):
    """What a torch function called on marked data costs the host: a wait kind, or None."""
    if func in _TO_HOST:
        return func.__name__.strip("_")
    if func in _DATA_DEPENDENT:
        return func.__name__
    if func is torch.where and len(args) == 1 and not kwargs:
        return "where (nonzero)"
    if func in (torch.repeat_interleave, _T.repeat_interleave) and "output_size" not in kwargs:
        return "repeat_interleave"
    if func in (_T.__getitem__, _T.__setitem__, _T.index_put, _T.index_put_):
        index = args[1] if len(args) > 1 else None
        indices = index if isinstance(index, (tuple, list)) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0
               for i in indices):
            # A boolean mask set from a scalar is a masked fill: no wait.
            if func is _T.__setitem__ and not isinstance(args[2], torch.Tensor):
                return None
            return f"{func.__name__.strip('_')} with a boolean mask"
    if func in (_T.split, torch.split) and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return "split by tensor sizes"
    return None


def _to_target(args, kwargs):
    """The device a Tensor.to call asks for, and whether it is non-blocking."""
    device = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
            device = a
        elif isinstance(a, torch.Tensor):
            device = a.device
    non_blocking = bool(kwargs.get("non_blocking", False))
    if len(args) > 2 and isinstance(args[-1], bool):
        non_blocking = args[-1]
    return device, non_blocking


@dataclass
class HostWaits:
    """What ran inside one ``count_host_waits`` block."""

    forward: Counter = field(default_factory=Counter)
    backward: Counter = field(default_factory=Counter)
    deferred: int = 0
    """Non-blocking device-to-host copies (they wait where an event is synchronised)."""
    where: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.forward.values()) + sum(self.backward.values())

    def as_dict(self) -> Dict[str, object]:
        return {"total": self.total, "forward": dict(self.forward), "backward": dict(self.backward),
                "deferred": self.deferred}


def _caller() -> str:
    import traceback

    for frame in reversed(traceback.extract_stack()[:-3]):
        if "host_waits.py" not in frame.filename and "/torch/" not in frame.filename:
            return f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"
    return "?"


class _Forward(TorchFunctionMode):
    def __init__(self, waits: HostWaits, backward: "_Backward"):
        super().__init__()
        self.waits = waits
        self.backward = backward

    def _count(self, kind: str) -> None:
        # Custom autograd functions run their backward in Python, through this mode.
        (self.waits.backward if self.backward.active else self.waits.forward)[kind] += 1
        self.waits.where.append(f"{kind} at {_caller()}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _T.backward or func is torch.autograd.backward:
            self.backward.active = True
            try:
                return func(*args, **kwargs)
            finally:
                self.backward.active = False
        marked = _any_marked(args, kwargs)
        if func is _T.to or func is _T.cuda:
            device, non_blocking = (_to_target(args, kwargs) if func is _T.to
                                    else (_GPU, bool(kwargs.get("non_blocking", False))))
            if marked and device is not None and _is_cpu(device):
                if non_blocking:
                    self.waits.deferred += 1
                else:
                    self._count("copy to host")
                return _unmark(func(*args, **kwargs))
            if not marked and device is not None and _is_cuda(device):
                if not (non_blocking and args[0].is_pinned()):
                    self._count("blocking copy to device")
                rest = [a.dtype if isinstance(a, torch.Tensor) else a for a in args[1:]
                        if not (isinstance(a, (str, torch.device, int)) and not isinstance(a, bool))]
                out = func(args[0], *rest, **{k: v for k, v in kwargs.items() if k != "device"})
                # A copy, as a transfer to the device would make.
                return mark(out.clone() if out is args[0] else out)
            if marked and device is not None and _is_cuda(device):
                return args[0]
        elif marked:
            kind = _kind_of(func, args, kwargs)
            if kind is not None:
                self._count(kind)
            if func in _TO_HOST:
                return _unmark(func(*args, **kwargs))
        cuda_factory = "device" in kwargs and _is_cuda(kwargs["device"])
        if cuda_factory:  # made where the marked data lives: the CPU
            kwargs = dict(kwargs, device="cpu")
        out = func(*args, **kwargs)
        if cuda_factory or (marked and func not in _TO_HOST):
            return _mark_all(out)
        return out


class _Backward(TorchDispatchMode):
    def __init__(self, waits: HostWaits):
        super().__init__()
        self.waits = waits
        self.active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active:
            name = func._schema.name.split("::")[-1]
            if name in _BACKWARD_WAITS:
                self.waits.backward[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_waits() -> Iterator[HostWaits]:
    """Count host waits of the code run inside; what ``backward()`` runs counts as backward."""
    waits = HostWaits()
    backward_mode = _Backward(waits)
    forward_mode = _Forward(waits, backward_mode)
    make_tensor = torch.tensor

    # torch.tensor is not seen by function modes, and a marked tensor's device says cuda.
    def tensor(data, *args, device=None, **kwargs):
        if device is not None and _is_cuda(device):
            forward_mode._count("blocking copy to device")
            return mark(make_tensor(data, *args, **kwargs))
        return make_tensor(data, *args, device=device, **kwargs)

    torch.tensor = tensor
    try:
        with backward_mode, forward_mode:
            yield waits
    finally:
        torch.tensor = make_tensor
