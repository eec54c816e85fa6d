"""The collectives of context-parallel attention, each counting the bytes this rank sends.

The counts are what the cost model's formulas (``folding.cost.context_parallel``) predict, so a
test can hold the two equal. A rank is said to send the data it contributes that another rank
needs: a block passed to the next rank of the ring; its own block to each of the other CP - 1
ranks in an all-gather; every part but its own in an all-to-all or a reduce-scatter (a ring
algorithm sends exactly these amounts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.distributed as dist
from torch import Tensor

PHASES = ("forward", "backward")


@dataclass
class ExchangeCounter:
    """Bytes one rank sent for one attention layer, split by pass, and the calls made."""

    forward: int = 0
    backward: int = 0
    calls: List[str] = field(default_factory=list)

    def add(self, phase: str, what: str, nbytes: int) -> None:
        setattr(self, phase, getattr(self, phase) + int(nbytes))
        self.calls.append(f"{phase}:{what}")

    def reset(self) -> None:
        self.forward = self.backward = 0
        self.calls.clear()


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class RingShift:
    """Send ``tensor`` to the next CP rank and receive the previous rank's, without blocking;
    ``wait()`` returns what arrived."""

    def __init__(self, tensor: Tensor, group, counter: ExchangeCounter, phase: str, what: str):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        tensor = tensor.contiguous()
        self.received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, dist.get_global_rank(group, (rank + 1) % size), group),
               dist.P2POp(dist.irecv, self.received, dist.get_global_rank(group, (rank - 1) % size),
                          group)]
        self.requests = dist.batch_isend_irecv(ops)
        self._keep = tensor  # the send buffer must live until the send completes
        counter.add(phase, what, _bytes(tensor))

    def wait(self) -> Tensor:
        for request in self.requests:
            request.wait()
        self._keep = None
        return self.received


def all_gather(tensor: Tensor, group, counter: ExchangeCounter, phase: str, what: str) -> Tensor:
    """Every rank's ``tensor`` stacked in CP-rank order: [CP, *tensor.shape]."""
    size = dist.get_world_size(group)
    out = torch.empty((size * tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
    counter.add(phase, what, (size - 1) * _bytes(tensor))
    return out.view((size,) + tuple(tensor.shape))


def reduce_scatter(parts: Tensor, group, counter: ExchangeCounter, phase: str, what: str) -> Tensor:
    """``parts`` [CP, ...]: part i summed over the ranks arrives at rank i."""
    size = parts.shape[0]
    out = torch.empty(parts.shape[1:], dtype=parts.dtype, device=parts.device)
    dist.reduce_scatter_tensor(out, parts.contiguous().view((-1,) + tuple(parts.shape[2:])),
                               group=group)
    counter.add(phase, what, (size - 1) * _bytes(out))
    return out


def all_to_all(parts: Tensor, group, counter: ExchangeCounter, phase: str, what: str) -> Tensor:
    """``parts`` [CP, ...]: part i goes to rank i; returns the parts received, by source rank."""
    size = parts.shape[0]
    parts = parts.contiguous()
    out = torch.empty(parts.shape, dtype=parts.dtype, device=parts.device)
    dist.all_to_all_single(out, parts, group=group)
    counter.add(phase, what, (size - 1) * _bytes(parts) // size)
    return out
