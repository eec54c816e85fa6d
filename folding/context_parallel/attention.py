"""Context-parallel core attention for Megatron's layer spec, without Transformer Engine.

Each CP rank holds the queries, keys and values of its two chunks of the sequence (Megatron's
load-balanced layout, ``folding.context_parallel.layout``). The three exchanges Megatron names
by ``cp_comm_type``:

- ``p2p``: keys and values travel a ring over the CP group. At step i rank r attends to the
  block of rank r - i while the next block is already on its way; partial outputs are merged
  through their log-sum-exp. The backward pass runs a second ring: blocks travel again, each
  with the dK/dV accumulated for it so far, which returns to its owner after CP hops. Only the
  rank's own q, k, v, output and log-sum-exp are kept for backward.
- ``all_gather``: keys and values are gathered over CP for the forward, gathered again in the
  backward (rather than kept), and dK/dV are reduce-scattered back to their owners.
- ``a2a``: Ulysses. q, k and v are exchanged so that each rank holds the whole sequence for
  heads / CP of the heads (and query groups / CP of the groups), attends locally, and the
  output goes back the same way; needs heads and groups per TP rank divisible by CP.

Every collective counts the bytes it sends in the module's ``exchange`` counter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from folding.context_parallel.exchange import (ExchangeCounter, RingShift, all_gather, all_to_all,
                                               reduce_scatter)
from folding.context_parallel.kernel import (_heads_first, block_backward, block_forward, merge,
                                             to_megatron_layout)
from folding.context_parallel.layout import gathered_positions, rank_chunks
from folding.errors import FoldingError

CP_COMM_TYPES = ("p2p", "all_gather", "a2a")


def _group_size_rank(group) -> Tuple[int, int]:
    import torch.distributed as dist

    return dist.get_world_size(group), dist.get_rank(group)


def _chunk_positions(chunk_index: int, chunk: int, device) -> Tensor:
    return torch.arange(chunk_index * chunk, (chunk_index + 1) * chunk, device=device)


def _keep_for_backward(ctx, tensors, group, scale, counter) -> None:
    """What p2p and all_gather keep: this rank's q, k, v, output and log-sum-exp, no more."""
    ctx.save_for_backward(*tensors)
    ctx.group, ctx.scale, ctx.counter = group, scale, counter


def _kept_for_backward(ctx):
    return ctx.saved_tensors, ctx.group, ctx.scale, ctx.counter


# ---------------------------------------------------------------------------------- p2p ring
def _ring_blocks(cp: int, rank: int, src: int, chunk: int):
    """(query half, key half, diagonal) for every pair of chunks with visible keys: query chunk
    ``a`` of this rank against key chunk ``b`` of rank ``src``."""
    for a, q_chunk in enumerate(rank_chunks(cp, rank)):
        for b, k_chunk in enumerate(rank_chunks(cp, src)):
            if k_chunk <= q_chunk:
                yield slice(a * chunk, (a + 1) * chunk), slice(b * chunk, (b + 1) * chunk), k_chunk == q_chunk


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale, counter):
        cp, rank = _group_size_rank(group)
        chunk = q.shape[0] // 2
        diagonal = _chunk_positions(0, chunk, q.device)
        outs: List[Optional[Tensor]] = [None, None]
        lses: List[Optional[Tensor]] = [None, None]
        kv = torch.stack([k, v])
        for step in range(cp):
            src = (rank - step) % cp
            shift = RingShift(kv, group, counter, "forward", "kv") if step < cp - 1 else None
            for qs, ks, diag in _ring_blocks(cp, rank, src, chunk):
                half = 0 if qs.start == 0 else 1
                pos = (diagonal, diagonal) if diag else (None, None)
                o, l = block_forward(q[qs], kv[0, ks], kv[1, ks], scale, *pos)
                outs[half], lses[half] = merge(outs[half], lses[half], o, l)
            if shift is not None:
                kv = shift.wait()
        out = to_megatron_layout(torch.cat(outs, dim=2), q.dtype)
        lse = torch.cat(lses, dim=2)
        _keep_for_backward(ctx, (q, k, v, out, lse), group, scale, counter)
        return out

    @staticmethod
    def backward(ctx, dout):
        (q, k, v, out, lse), group, scale, counter = _kept_for_backward(ctx)
        cp, rank = _group_size_rank(group)
        chunk = q.shape[0] // 2
        diagonal = _chunk_positions(0, chunk, q.device)
        dout_h, out_h = _heads_first(dout), _heads_first(out)
        dq = torch.zeros_like(out_h)
        kv = torch.stack([k, v])
        dkv = torch.zeros_like(kv)  # the accumulator of the block held now; travels with it
        for step in range(cp):
            src = (rank - step) % cp
            shift = RingShift(kv, group, counter, "backward", "kv") if step < cp - 1 else None
            dkv_step = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            for qs, ks, diag in _ring_blocks(cp, rank, src, chunk):
                pos = (diagonal, diagonal) if diag else (None, None)
                hq = slice(qs.start, qs.stop)
                dq_b, dk_b, dv_b = block_backward(
                    dout_h[:, :, hq], out_h[:, :, hq], lse[:, :, hq], q[qs], kv[0, ks], kv[1, ks],
                    scale, *pos)
                dq[:, :, hq] += dq_b
                dkv_step[0, ks] += dk_b.permute(2, 0, 1, 3)
                dkv_step[1, ks] += dv_b.permute(2, 0, 1, 3)
            dkv = (dkv.float() + dkv_step).to(kv.dtype)
            if cp > 1:  # a ring of one rank: the accumulator is already home
                dkv = RingShift(dkv, group, counter, "backward", "dkv").wait()
            if shift is not None:
                kv = shift.wait()
        return to_megatron_layout(dq, q.dtype), dkv[0], dkv[1], None, None, None


# ------------------------------------------------------------- attention over given positions
def _attend(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float,
            piece: int) -> Tuple[Tensor, Tensor]:
    """Causal attention of ``q`` over ``k``/``v`` by position, ``piece`` queries at a time, each
    piece against only the keys at or before its last position."""
    outs, lses = [], []
    for start in range(0, q.shape[0], piece):
        qp = q_pos[start:start + piece]
        keep = k_pos <= qp.max()
        o, l = block_forward(q[start:start + piece], k[keep], v[keep], scale, qp, k_pos[keep])
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _attend_backward(dout_h, out_h, lse, q, k, v, q_pos, k_pos, scale, piece):
    """Gradients of ``_attend``: dq [b, heads, sq, d]; dk, dv [s, b, groups, d] (fp32)."""
    dq = torch.zeros_like(out_h)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros_like(dk)
    for start in range(0, q.shape[0], piece):
        rows = slice(start, start + piece)
        qp = q_pos[rows]
        keep = k_pos <= qp.max()
        dq_p, dk_p, dv_p = block_backward(dout_h[:, :, rows], out_h[:, :, rows], lse[:, :, rows],
                                          q[rows], k[keep], v[keep], scale, qp, k_pos[keep])
        dq[:, :, rows] = dq_p
        dk[keep] += dk_p.permute(2, 0, 1, 3)
        dv[keep] += dv_p.permute(2, 0, 1, 3)
    return dq, dk, dv


class _GatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale, counter):
        cp, rank = _group_size_rank(group)
        seq = q.shape[0] * cp
        k_all, v_all, k_pos = _gather_kv(k, v, group, counter, "forward")
        q_pos = k_pos.view(cp, -1)[rank]
        out_h, lse = _attend(q, k_all, v_all, q_pos, k_pos, scale, piece=seq // (2 * cp))
        out = to_megatron_layout(out_h, q.dtype)
        _keep_for_backward(ctx, (q, k, v, out, lse), group, scale, counter)
        return out

    @staticmethod
    def backward(ctx, dout):
        (q, k, v, out, lse), group, scale, counter = _kept_for_backward(ctx)
        cp, rank = _group_size_rank(group)
        seq = q.shape[0] * cp
        k_all, v_all, k_pos = _gather_kv(k, v, group, counter, "backward")
        q_pos = k_pos.view(cp, -1)[rank]
        dq, dk, dv = _attend_backward(_heads_first(dout), _heads_first(out), lse, q, k_all, v_all,
                                      q_pos, k_pos, scale, piece=seq // (2 * cp))
        parts = torch.stack([dk, dv]).to(k.dtype).view(2, cp, *k.shape).transpose(0, 1)
        dkv = reduce_scatter(parts, group, counter, "backward", "dkv")
        return to_megatron_layout(dq, q.dtype), dkv[0], dkv[1], None, None, None


def _gather_kv(k, v, group, counter, phase):
    cp = _group_size_rank(group)[0]
    gathered = all_gather(torch.stack([k, v]), group, counter, phase, "kv")  # [cp, 2, L, ...]
    k_all = gathered[:, 0].reshape(-1, *k.shape[1:])
    v_all = gathered[:, 1].reshape(-1, *v.shape[1:])
    return k_all, v_all, gathered_positions(k_all.shape[0], cp).to(k.device)


# ------------------------------------------------------------------------------ a2a (Ulysses)
class _Regroup(torch.autograd.Function):
    """The a2a exchange and its inverse. ``to_sequence``: [L, b, n, d] on each rank ->
    [CP x L, b, n / CP, d], the whole sequence in CP-rank order for this rank's n / CP heads;
    otherwise back. The backward pass is the other direction."""

    @staticmethod
    def forward(ctx, x, to_sequence, group, counter, what):
        ctx.to_sequence, ctx.group, ctx.counter, ctx.what = to_sequence, group, counter, what
        regroup = _sequence_gather if to_sequence else _head_gather
        return regroup(x, group, counter, "forward", what)

    @staticmethod
    def backward(ctx, grad):
        regroup = _head_gather if ctx.to_sequence else _sequence_gather
        return regroup(grad, ctx.group, ctx.counter, "backward", ctx.what), None, None, None, None


def _sequence_gather(x, group, counter, phase, what):
    cp = _group_size_rank(group)[0]
    L, b, n, d = x.shape
    parts = x.reshape(L, b, cp, n // cp, d).permute(2, 0, 1, 3, 4)
    return all_to_all(parts, group, counter, phase, what).reshape(cp * L, b, n // cp, d)


def _head_gather(x, group, counter, phase, what):
    cp = _group_size_rank(group)[0]
    S, b, n, d = x.shape
    parts = x.reshape(cp, S // cp, b, n, d)
    received = all_to_all(parts, group, counter, phase, what)  # [head part, L, b, n, d]
    return received.permute(1, 2, 0, 3, 4).reshape(S // cp, b, cp * n, d)


class _LocalAttention(torch.autograd.Function):
    """Causal attention over the whole gathered sequence for this rank's heads."""

    @staticmethod
    def forward(ctx, q, k, v, cp, scale, piece):
        positions = gathered_positions(q.shape[0], cp).to(q.device)
        out_h, lse = _attend(q, k, v, positions, positions, scale, piece)
        out = to_megatron_layout(out_h, q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)  # the positions are recomputed, not kept
        ctx.cp, ctx.scale, ctx.piece = cp, scale, piece
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        positions = gathered_positions(q.shape[0], ctx.cp).to(q.device)
        dq, dk, dv = _attend_backward(_heads_first(dout), _heads_first(out), lse, q, k, v,
                                      positions, positions, ctx.scale, ctx.piece)
        return (to_megatron_layout(dq, q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None)


def _ulysses(q, k, v, group, scale, counter):
    cp = _group_size_rank(group)[0]
    seq = q.shape[0] * cp
    qf = _Regroup.apply(q, True, group, counter, "q")
    kf = _Regroup.apply(k, True, group, counter, "k")
    vf = _Regroup.apply(v, True, group, counter, "v")
    out = _LocalAttention.apply(qf, kf, vf, cp, scale, seq // (2 * cp))
    return _Regroup.apply(out, False, group, counter, "out")


def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, group, mode: str = "p2p",
                               scale: Optional[float] = None,
                               counter: Optional[ExchangeCounter] = None) -> Tensor:
    """Causal attention of this CP rank's queries over the whole sequence.

    ``q`` [L, b, heads, d], ``k``/``v`` [L, b, groups, d]: this rank's two chunks of Megatron's
    CP layout. Returns [L, b, heads, d].
    """
    if mode not in CP_COMM_TYPES:
        raise FoldingError(f"unknown cp comm type {mode!r}; known: {', '.join(CP_COMM_TYPES)}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    counter = counter if counter is not None else ExchangeCounter()
    if q.shape[0] % 2:
        raise FoldingError(f"a CP rank holds two equal chunks; got {q.shape[0]} tokens")
    if mode == "p2p":
        return _RingAttention.apply(q, k, v, group, scale, counter)
    if mode == "all_gather":
        return _GatherAttention.apply(q, k, v, group, scale, counter)
    cp = _group_size_rank(group)[0]
    if q.shape[2] % cp or k.shape[2] % cp:
        raise FoldingError(f"cp comm type a2a needs heads ({q.shape[2]}) and query groups "
                           f"({k.shape[2]}) per TP rank divisible by CP={cp}")
    return _ulysses(q, k, v, group, scale, counter)


# --------------------------------------------------------------------------- Megatron module
def _megatron_module_base():
    from megatron.core.transformer.module import MegatronModule

    return MegatronModule


class ContextParallelAttention(_megatron_module_base()):
    """A drop-in ``core_attention`` for Megatron's local layer spec with CP > 1: same
    constructor and forward signature as Megatron's ``DotProductAttention``."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **unused):
        super().__init__(config=config)
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.enums import AttnMaskType

        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise FoldingError(f"context-parallel attention without Transformer Engine has no "
                               f"attention dropout (attention_dropout={dropout})")
        if attn_mask_type != AttnMaskType.causal:
            raise FoldingError(f"context-parallel attention without Transformer Engine is causal "
                               f"only (attn_mask_type={attn_mask_type.name})")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise FoldingError(f"context-parallel attention supports the vanilla softmax only "
                               f"(softmax_type={config.softmax_type})")
        self.layer_number = layer_number
        group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = group if group is not None else ps.get_context_parallel_group()
        mode = cp_comm_type if cp_comm_type is not None else (config.cp_comm_type or "p2p")
        if isinstance(mode, (list, tuple)):
            mode = mode[layer_number - 1]
        if mode not in CP_COMM_TYPES:
            raise FoldingError(f"unknown cp comm type {mode!r}; known: {', '.join(CP_COMM_TYPES)}")
        self.cp_comm_type = mode
        kv_channels = config.kv_channels or config.hidden_size // config.num_attention_heads
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(kv_channels)
        self.exchange = ExchangeCounter()

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        if packed_seq_params is not None or attention_bias is not None:
            raise FoldingError("context-parallel attention without Transformer Engine takes no "
                               "packed sequences and no attention bias")
        out = context_parallel_attention(query, key, value, self.cp_group, self.cp_comm_type,
                                         self.softmax_scale, self.exchange)
        return out.reshape(out.shape[0], out.shape[1], -1)


def context_parallel_layer_spec(layer_spec):
    """``layer_spec`` with Megatron's local ``DotProductAttention`` replaced by
    ``ContextParallelAttention`` (a Transformer Engine spec, which has its own CP, is returned
    unchanged)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    attention = layer_spec.submodules.self_attention
    core = attention.submodules.core_attention
    core_class = getattr(core, "module", core)
    if core_class is ContextParallelAttention or core_class is not DotProductAttention:
        return layer_spec
    submodules = dataclasses.replace(attention.submodules, core_attention=ContextParallelAttention)
    attention = dataclasses.replace(attention, submodules=submodules)
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(
        layer_spec.submodules, self_attention=attention))


def exchange_counters(model) -> List[ExchangeCounter]:
    """The byte counters of every context-parallel attention in ``model``."""
    return [m.exchange for m in model.modules() if isinstance(m, ContextParallelAttention)]
