"""An all-to-all that only talks to the peers it exchanges rows with.

A relayed dispatch (node-level deduplication) sends its first hop to one rank of each remote
node and to the ranks of its own node, and its second hop inside the node only. A collective
all-to-all over the whole EP group still pays for every pair of ranks; this exchange posts a
send only where the row count is not zero and a receive only where rows are expected (both
sides know the counts from the dispatch's count exchange), as one batch of point-to-point
operations (NCCL groups them; gloo runs them concurrently). Rows for the rank itself are a
local copy. The backward pass exchanges the gradients the other way.

Several tensors with the same rows (16-bit hidden states and their fp32 routing weights) go
in the same batch: one synchronized exchange per hop, not one per tensor.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist


def exchange_rows(tensors: Sequence[torch.Tensor], output_splits: Sequence[int],
                  input_splits: Sequence[int], peers: Sequence[int], own: int) -> List[torch.Tensor]:
    """Each tensor's rows, ``input_splits[i]`` of them for peer i (global rank ``peers[i]``),
    sent; ``output_splits[i]`` rows received from each, returned in peer order, one tensor per
    input, all in one batch of operations. ``own``: this rank's index in ``peers``."""
    ops: List[dist.P2POp] = []
    outputs = []
    for tensor in tensors:
        tensor = tensor.contiguous()
        out = tensor.new_empty((sum(output_splits),) + tuple(tensor.shape[1:]))
        outputs.append(out)
        sends, receives = tensor.split(list(input_splits)), out.split(list(output_splits))
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
    return outputs


class _PeerAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output_splits, input_splits, peers, own, *tensors):
        ctx.exchange = (output_splits, input_splits, peers, own)
        return tuple(exchange_rows(tensors, output_splits, input_splits, peers, own))

    @staticmethod
    def backward(ctx, *grads):
        output_splits, input_splits, peers, own = ctx.exchange
        grads = exchange_rows(grads, input_splits, output_splits, peers, own)
        return (None, None, None, None, *grads)


def peer_all_to_all(tensors: Sequence[torch.Tensor], output_splits: Sequence[int],
                    input_splits: Sequence[int], peers: Sequence[int],
                    own: int) -> List[torch.Tensor]:
    """``exchange_rows`` with autograd: the gradient of each received row goes back to its
    sender, the gradients of all the tensors in one batch too."""
    return list(_PeerAllToAll.apply(list(output_splits), list(input_splits), list(peers), own,
                                    *tensors))
