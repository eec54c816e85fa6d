"""Attention over one block of queries and keys, returning its log-sum-exp, and its backward.

Context-parallel attention computes a rank's output from blocks of keys it sees one at a time
(p2p) or all at once (all_gather, a2a). A block's output is merged with the others through its
log-sum-exp, and the backward pass of a block needs only the merged output and log-sum-exp, so
no attention probabilities outlive the block that made them. Masks come from token positions:
key j is visible to query i when position(j) <= position(i).

Tensors use Megatron's core-attention layout: queries [s, b, heads, d], keys and values
[s, b, groups, d] (grouped-query attention: ``heads // groups`` heads share a group). Scores,
softmax and accumulators are fp32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _heads_first(x: Tensor, repeat: int = 1) -> Tensor:
    """[s, b, n, d] -> [b, n * repeat, s, d] in fp32."""
    x = x.permute(1, 2, 0, 3).float()
    return x.repeat_interleave(repeat, dim=1) if repeat > 1 else x


def _scores(q: Tensor, k: Tensor, q_pos: Optional[Tensor], k_pos: Optional[Tensor],
            scale: float) -> Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if q_pos is not None:
        hidden = k_pos.view(1, -1) > q_pos.view(-1, 1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


def block_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, q_pos: Optional[Tensor] = None,
                  k_pos: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Softmax attention of ``q`` over ``k``/``v``; positions given means causal by position.

    Returns the output [b, heads, sq, d] and the log-sum-exp [b, heads, sq], both fp32. Every
    query must see at least one key (the callers never build a fully hidden row).
    """
    repeat = q.shape[2] // k.shape[2]
    qh, kh, vh = _heads_first(q), _heads_first(k, repeat), _heads_first(v, repeat)
    scores = _scores(qh, kh, q_pos, k_pos, scale)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vh)
    return out, lse


def merge(out: Optional[Tensor], lse: Optional[Tensor], block_out: Tensor,
          block_lse: Tensor) -> Tuple[Tensor, Tensor]:
    """Combine two partial softmax results over disjoint keys through their log-sum-exps."""
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    out = (out * torch.exp(lse - new_lse).unsqueeze(-1)
           + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1))
    return out, new_lse


def block_backward(dout: Tensor, out: Tensor, lse: Tensor, q: Tensor, k: Tensor, v: Tensor,
                   scale: float, q_pos: Optional[Tensor] = None,
                   k_pos: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block given the final (merged) output and log-sum-exp of its queries.

    ``dout``, ``out`` [b, heads, sq, d] and ``lse`` [b, heads, sq] are fp32. Returns dq
    [b, heads, sq, d] and dk, dv [b, groups, sk, d] (summed over the heads of each group), fp32.
    """
    groups = k.shape[2]
    repeat = q.shape[2] // groups
    qh, kh, vh = _heads_first(q), _heads_first(k, repeat), _heads_first(v, repeat)
    probs = torch.exp(_scores(qh, kh, q_pos, k_pos, scale) - lse.unsqueeze(-1))
    dv = torch.matmul(probs.transpose(-1, -2), dout)
    dprobs = torch.matmul(dout, vh.transpose(-1, -2))
    row = (dout * out).sum(-1, keepdim=True)
    dscores = probs * (dprobs - row) * scale
    dq = torch.matmul(dscores, kh)
    dk = torch.matmul(dscores.transpose(-1, -2), qh)
    b, _, sk, d = dk.shape
    return (dq, dk.view(b, groups, repeat, sk, d).sum(2), dv.view(b, groups, repeat, sk, d).sum(2))


def to_megatron_layout(x: Tensor, dtype: torch.dtype) -> Tensor:
    """[b, n, s, d] -> [s, b, n, d] in ``dtype``."""
    return x.permute(2, 0, 1, 3).to(dtype)
