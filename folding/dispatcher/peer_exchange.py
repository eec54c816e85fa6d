"""An all-to-all that only talks to the peers it exchanges rows with.

A relayed dispatch (node-level deduplication) sends its first hop to one rank of each remote
node and to the ranks of its own node, and its second hop inside the node only. A collective
all-to-all over the whole EP group still pays for every pair of ranks; this exchange posts a
send only where the row count is not zero and a receive only where rows are expected (both
sides know the counts from the dispatch's count exchange), as one batch of point-to-point
operations (NCCL groups them; gloo runs them concurrently). Rows for the rank itself are a
local copy. The backward pass exchanges the gradients the other way.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist


def exchange_rows(tensor: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int],
                  peers: Sequence[int], own: int) -> torch.Tensor:
    """``tensor``'s rows, ``input_splits[i]`` of them for peer i (global rank ``peers[i]``), sent;
    ``output_splits[i]`` rows received from each, returned in peer order. ``own``: this rank's
    index in ``peers``."""
    tensor = tensor.contiguous()
    out = tensor.new_empty((sum(output_splits),) + tuple(tensor.shape[1:]))
    sends, receives = tensor.split(list(input_splits)), out.split(list(output_splits))
    ops: List[dist.P2POp] = []
    for index, (send, receive) in enumerate(zip(sends, receives)):
        if index == own:
            receive.copy_(send)
            continue
        if receive.shape[0]:
            ops.append(dist.P2POp(dist.irecv, receive, peers[index]))
        if send.shape[0]:
            ops.append(dist.P2POp(dist.isend, send, peers[index]))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return out


class _PeerAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, output_splits, input_splits, peers, own):
        ctx.exchange = (output_splits, input_splits, peers, own)
        return exchange_rows(tensor, output_splits, input_splits, peers, own)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits, peers, own = ctx.exchange
        return exchange_rows(grad, input_splits, output_splits, peers, own), None, None, None, None


def peer_all_to_all(tensor: torch.Tensor, output_splits: Sequence[int],
                    input_splits: Sequence[int], peers: Sequence[int], own: int) -> torch.Tensor:
    """``exchange_rows`` with autograd: the gradient of each received row goes back to its
    sender."""
    return _PeerAllToAll.apply(tensor, list(output_splits), list(input_splits), list(peers), own)
