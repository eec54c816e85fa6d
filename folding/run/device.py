"""Where local ranks run: one GPU per rank with NCCL, or the CPU with gloo, never a mix.

``resolve_device`` is a pure function of what was asked and what the machine has, so every
branch can be checked without a GPU. ``pick_device`` asks torch for the machine's side.
The launcher passes the choice to each rank through ``DEVICE_ENV``; the CPU runtime reads it
there, so that a CPU run stays on the CPU on a machine that also has GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from folding.errors import FoldingError

DEVICES = ("auto", "cpu", "cuda")
DEVICE_ENV = "FOLDING_DEVICE"
"""Set in every spawned rank to the chosen kind ("cpu" or "cuda")."""


@dataclass(frozen=True)
class DeviceChoice:
    kind: str
    """"cpu" or "cuda"."""
    backend: str
    """The torch.distributed backend that goes with it: "gloo" or "nccl"."""
    reason: str
    """One line: what was asked, what was found, what is used."""

    @property
    def on_gpu(self) -> bool:
        return self.kind == "cuda"

    def ranks(self, world_size: int) -> str:
        """``8 CPU ranks (gloo)`` or ``8 GPU ranks (NCCL)``."""
        plural = "" if world_size == 1 else "s"
        return f"{world_size} {'GPU' if self.on_gpu else 'CPU'} rank{plural} ({self.backend_name})"

    @property
    def backend_name(self) -> str:
        return "NCCL" if self.backend == "nccl" else self.backend

    def to_json(self) -> dict:
        return {"kind": self.kind, "backend": self.backend, "reason": self.reason}


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def resolve_device(requested: str, world_size: int, cuda_available: bool,
                   device_count: int) -> DeviceChoice:
    """Decide where ``world_size`` local ranks run.

    ``cpu``: the CPU with gloo, whatever GPUs there are. ``cuda``: one GPU per rank with NCCL,
    refused when CUDA is absent or there are fewer GPUs than ranks (sharing a GPU between ranks
    is not what a GPU run of a folding measures). ``auto``: ``cuda`` where it would be accepted,
    else ``cpu``.
    """
    if requested not in DEVICES:
        raise FoldingError(f"--device {requested!r} is not one of {', '.join(DEVICES)}")
    ranks = f"{world_size} rank" if world_size == 1 else f"{world_size} ranks"
    count = device_count if cuda_available else 0
    if requested == "cpu":
        return DeviceChoice("cpu", "gloo", f"--device cpu: {ranks} on the CPU with gloo")
    if requested == "cuda":
        if not cuda_available:
            raise FoldingError("--device cuda: CUDA is not available here (no GPU visible to "
                               "torch); use --device cpu or auto")
        if count < world_size:
            raise FoldingError(f"--device cuda needs one GPU per rank: {ranks}, "
                               f"{_gpus(count)} visible; use --device cpu or auto")
        return DeviceChoice("cuda", "nccl",
                            f"--device cuda: {_gpus(count)} for {ranks}, one GPU per rank with NCCL")
    if not cuda_available:
        return DeviceChoice("cpu", "gloo", "auto: CUDA is not available, using the CPU with gloo")
    if count < world_size:
        return DeviceChoice("cpu", "gloo",
                            f"auto: {_gpus(count)} for {ranks}, using the CPU with gloo")
    return DeviceChoice("cuda", "nccl",
                        f"auto: {_gpus(count)} for {ranks}, one GPU per rank with NCCL")


def pick_device(requested: str, world_size: int) -> DeviceChoice:
    """``resolve_device`` for this machine."""
    import torch

    available = torch.cuda.is_available()
    return resolve_device(requested, world_size, available,
                          torch.cuda.device_count() if available else 0)


CPU = DeviceChoice("cpu", "gloo", "the CPU with gloo")
"""The launcher's choice when its caller names none."""


def rank_device():
    """The torch device of this rank's tensors: its GPU under NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize(device) -> None:
    """Wait for the device's queued work, so that a clock read afterwards measures it."""
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize(device)


def requested_in_rank() -> str:
    """The kind the launcher chose for this process ("" outside a launched rank)."""
    return os.environ.get(DEVICE_ENV, "")
