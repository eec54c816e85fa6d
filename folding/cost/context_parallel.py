"""Bytes that context-parallel attention moves and keeps, per mode: the cost side of CP.

This module owns the byte and memory formulas of the three ways context-parallel (CP) attention
can exchange keys and values (``FoldingSpec.cp_comm_type``): ``p2p`` (a ring of K/V blocks),
``all_gather`` (K/V gathered over the CP group) and ``a2a`` (heads scattered and sequence
gathered, all-to-all). It is pure integer arithmetic: no process groups, no Megatron, no torch.
The step-time model (``folding.cost.step_time``) turns these bytes into seconds; the CP attention
module and its benchmark compare them with bytes counted from real tensors, so every count here
is an exact integer.

Everything is per rank, per attention layer, per micro-batch. Per TP rank:

- H = num_attention_heads / TP, G = num_query_groups / TP, d = head_dim, L = seq_length / CP
  (the tokens a rank holds), b = micro-batch size, e = bytes per element;
- KV = 2 L b G d e, this rank's keys and values; Q = L b H d e, its queries; the attention
  output O has Q's size. With a value head dimension d_v different from d (multi-latent
  attention: K/V per head, d = the query/key head dimension), KV = L b G (d + d_v) e and
  O = L b H d_v e; the formulas read ``2Q`` as ``Q + O``.

Bytes a rank sends (what it receives is the same):

=========== ====================== ============================
mode        forward                backward
=========== ====================== ============================
p2p         (CP-1) KV              (CP-1) KV + CP KV = (2CP-1) KV
all_gather  (CP-1) KV              2 (CP-1) KV
a2a         (CP-1)/CP (2Q + KV)    (CP-1)/CP (2Q + KV)
=========== ====================== ============================

- p2p: the forward passes K/V blocks around the ring, CP-1 hops; the backward runs its own
  ring, K/V again CP-1 hops, and the dK/dV accumulators CP hops back to their owner.
- all_gather: the forward gathers K/V; the backward gathers them again instead of keeping them,
  then reduce-scatters dK/dV (ring algorithms, CP-1 steps of one KV each).
- a2a: q, k, v are scattered by heads and gathered by sequence, the output goes back the other
  way; the backward does the same four exchanges in reverse. Needs H and G divisible by CP.
- CP = 1 moves nothing in any mode.

Saved for backward by CP attention (activation memory, every mode): 2Q + KV bytes (q, k, v
and the output) plus the softmax log-sum-exp, L b H fp32 values. It shrinks as 1 / CP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from folding.errors import FoldingError
from folding.mesh import CP_COMM_TYPES

LSE_BYTES = 4
"""Bytes per log-sum-exp value (kept in fp32)."""

NOTATION = ("per rank, layer and micro-batch; H = heads / TP, G = query groups / TP, d = head dim, "
            "L = seq / CP, b = micro-batch, e = bytes per element; KV = 2*L*b*G*d*e, "
            "Q = L*b*H*d*e (the output O has Q's size)")

_FORMULAS: Dict[str, str] = {
    "p2p": "forward (CP-1)*KV, backward (2*CP-1)*KV",
    "all_gather": "forward (CP-1)*KV, backward 2*(CP-1)*KV",
    "a2a": "forward (CP-1)/CP*(2Q+KV), backward (CP-1)/CP*(2Q+KV)",
}

SAVED_FORMULA = "2Q + KV + 4*L*b*H (fp32 log-sum-exp)"


@dataclass(frozen=True)
class CPExchange:
    """Bytes one rank sends in one attention layer for one micro-batch."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


@dataclass(frozen=True)
class AttentionBytes:
    """The attention tensors of one rank, in bytes: queries, keys and values together, the
    output, and the fp32 log-sum-exp."""

    q: int
    kv: int
    out: int
    lse: int


def _check_mode(mode: str) -> None:
    if mode not in CP_COMM_TYPES:
        raise FoldingError(f"unknown cp comm type {mode!r}; known: {', '.join(CP_COMM_TYPES)}")


def formula(mode: str) -> str:
    """Human-readable bytes a rank sends forward and backward in ``mode`` (see ``NOTATION``)."""
    _check_mode(mode)
    return _FORMULAS[mode]


def attention_bytes(*, seq_length: int, micro_batch_size: int, num_attention_heads: int,
                    num_query_groups: int, head_dim: int, tp: int, cp: int, element_bytes: int,
                    value_head_dim: Optional[int] = None) -> AttentionBytes:
    """Q, KV, O and log-sum-exp bytes of this rank's L = seq_length / CP tokens and H / TP heads."""
    values = dict(seq_length=seq_length, micro_batch_size=micro_batch_size,
                  num_attention_heads=num_attention_heads, num_query_groups=num_query_groups,
                  head_dim=head_dim, tp=tp, cp=cp, element_bytes=element_bytes)
    if value_head_dim is not None:
        values["value_head_dim"] = value_head_dim
    bad = [f"{k}={v!r}" for k, v in values.items()
           if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise FoldingError(f"context-parallel bytes need positive integers: {', '.join(bad)}")
    for what, count in (("num_attention_heads", num_attention_heads),
                        ("num_query_groups", num_query_groups)):
        if count % tp:
            raise FoldingError(f"TP={tp} does not divide {what}={count}")
    if seq_length % cp:
        raise FoldingError(f"CP={cp} does not divide seq_length={seq_length}")
    heads, groups = num_attention_heads // tp, num_query_groups // tp
    dv = head_dim if value_head_dim is None else value_head_dim
    tokens = seq_length // cp * micro_batch_size
    return AttentionBytes(q=tokens * heads * head_dim * element_bytes,
                          kv=tokens * groups * (head_dim + dv) * element_bytes,
                          out=tokens * heads * dv * element_bytes,
                          lse=tokens * heads * LSE_BYTES)


def exchange_bytes(mode: str, *, seq_length: int, micro_batch_size: int, num_attention_heads: int,
                   num_query_groups: int, head_dim: int, tp: int, cp: int, element_bytes: int,
                   value_head_dim: Optional[int] = None) -> CPExchange:
    """Bytes one rank sends in one attention layer for one micro-batch, forward and backward,
    with context-parallel comm type ``mode`` (the table in the module docstring)."""
    _check_mode(mode)
    t = attention_bytes(seq_length=seq_length, micro_batch_size=micro_batch_size,
                        num_attention_heads=num_attention_heads, num_query_groups=num_query_groups,
                        head_dim=head_dim, tp=tp, cp=cp, element_bytes=element_bytes,
                        value_head_dim=value_head_dim)
    if cp == 1:
        return CPExchange(0, 0)
    if mode == "p2p":
        return CPExchange((cp - 1) * t.kv, (2 * cp - 1) * t.kv)
    if mode == "all_gather":
        return CPExchange((cp - 1) * t.kv, 2 * (cp - 1) * t.kv)
    # a2a: each of q, k, v and the output keeps 1/CP of itself and sends the rest.
    heads, groups = num_attention_heads // tp, num_query_groups // tp
    for what, count in (("num_attention_heads", heads), ("num_query_groups", groups)):
        if count % cp:
            raise FoldingError(f"cp comm type a2a needs {what} per TP rank divisible by CP: "
                               f"{count} is not divisible by CP={cp}")
    moved = t.q + t.kv + t.out
    assert (cp - 1) * moved % cp == 0
    one_way = (cp - 1) * moved // cp
    return CPExchange(one_way, one_way)


def saved_bytes(*, seq_length: int, micro_batch_size: int, num_attention_heads: int,
                num_query_groups: int, head_dim: int, tp: int, cp: int, element_bytes: int,
                value_head_dim: Optional[int] = None, mode: Optional[str] = None) -> int:
    """Bytes CP attention keeps for backward per rank and layer: q, k, v, the output and the
    fp32 log-sum-exp (2Q + KV + 4 L b H). The same in every mode (a2a holds the whole sequence
    for H / CP heads: the same sizes); ``mode``, when given, is checked."""
    kwargs = dict(seq_length=seq_length, micro_batch_size=micro_batch_size,
                  num_attention_heads=num_attention_heads, num_query_groups=num_query_groups,
                  head_dim=head_dim, tp=tp, cp=cp, element_bytes=element_bytes,
                  value_head_dim=value_head_dim)
    if mode is not None:
        exchange_bytes(mode, **kwargs)  # the mode's own checks (a2a: heads divisible by CP)
    t = attention_bytes(**kwargs)
    return t.q + t.kv + t.out + t.lse
