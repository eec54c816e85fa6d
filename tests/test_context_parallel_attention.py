"""Context-parallel attention without Transformer Engine against Megatron-Core.

Pure parts: the layout is the one Megatron's batch split cuts, the block kernel and its backward
equal autograd on a float64 reference, and the sequence-length messages. One 4-rank spawn: at
seq 4096 with grouped-query attention, every mode's output and q/k/v gradients, assembled from the
ranks by position, equal Megatron's own single-process ``DotProductAttention`` (float64); the
bytes each rank counts equal ``folding.cost.context_parallel.exchange_bytes`` exactly; the bytes
autograd keeps for backward equal ``saved_bytes`` exactly; and the ring keeps 1/CP of the K/V of
CP 1. A wrong layout fails the same check. A CP group of one rank (one small spawn) runs every
mode, sends nothing and equals Megatron too.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from folding.context_parallel.kernel import block_backward, block_forward, merge
from folding.context_parallel.layout import (check_sequence_length, rank_positions,
                                             sequence_length_problems)
from folding.cost.context_parallel import attention_bytes, exchange_bytes, saved_bytes
from folding.errors import FoldingError
from folding.testing.context_parallel_measure import (AttentionShape, Case, assemble,
                                                      measure_rank, relative_error)

MODES = ("p2p", "all_gather", "a2a")
TOLERANCE = 1e-5


# ------------------------------------------------------------------------------ the layout
class _FakeGroup:
    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _megatron_cut(monkeypatch, seq: int, cp: int, cp_rank: int) -> torch.Tensor:
    """The token positions Megatron's ``get_batch_on_this_cp_rank`` gives CP rank ``cp_rank``,
    called the way the trainer calls it (``rank_trainer._this_cp_rank_part``)."""
    import megatron.core.utils as mutils
    from megatron.core import parallel_state as ps

    from folding.run.rank_trainer import _this_cp_rank_part

    group = _FakeGroup(cp, cp_rank)
    monkeypatch.setattr(ps, "get_context_parallel_group", lambda *a, **k: group)
    # 0.16 asks the group through get_pg_size/get_pg_rank, 0.19 through torch.distributed.
    monkeypatch.setattr(mutils, "get_pg_size", lambda g=None: g.size(), raising=False)
    monkeypatch.setattr(mutils, "get_pg_rank", lambda g=None: g.rank(), raising=False)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda g=None: g.size())
    monkeypatch.setattr(torch.distributed, "get_rank", lambda g=None: g.rank())
    tokens = torch.arange(seq).repeat(2, 1)  # [b, s]: each token's value is its position
    part = _this_cp_rank_part({"tokens": tokens, "labels": tokens + 1})
    assert torch.equal(part["labels"], part["tokens"] + 1)
    assert torch.equal(part["tokens"][0], part["tokens"][1])
    return part["tokens"][0]


@pytest.mark.megatron
@pytest.mark.parametrize("seq, cp", [(32, 2), (32, 4), (64, 8), (4096, 4), (48, 3)])
def test_rank_positions_are_megatrons_cut(monkeypatch, seq, cp):
    for cp_rank in range(cp):
        assert torch.equal(_megatron_cut(monkeypatch, seq, cp, cp_rank),
                           rank_positions(seq, cp, cp_rank)), (seq, cp, cp_rank)


@pytest.mark.parametrize("seq, cp", [(32, 1), (32, 2), (64, 4), (4096, 8)])
def test_rank_positions_cover_the_sequence_with_equal_causal_work(seq, cp):
    parts = [rank_positions(seq, cp, r) for r in range(cp)]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(seq))
    assert all(p.numel() == seq // cp for p in parts)
    assert len({int((p + 1).sum()) for p in parts}) == 1  # keys seen, causal


def test_sequence_length_problems_messages():
    assert sequence_length_problems(4096, 1) == []
    assert sequence_length_problems(4096, 8, tp=4, sequence_parallel=True) == []
    assert sequence_length_problems(40, 2, tp=4) == []  # TP alone does not split the sequence
    assert sequence_length_problems(100, 1, tp=3, sequence_parallel=True) == [
        "seq-len=100 is not divisible by TP=3 (sequence parallel)"]
    assert sequence_length_problems(100, 4) == [
        "seq-len=100 is not divisible by 2 x CP = 2 x 4 = 8 (Megatron's load-balanced "
        "context-parallel split)"]
    assert sequence_length_problems(40, 2, tp=4, sequence_parallel=True) == [
        "seq-len=40 is not divisible by 2 x CP x TP = 2 x 2 x 4 = 16 (Megatron's load-balanced "
        "context-parallel split with sequence parallel)"]
    spec = SimpleNamespace(cp=4, tp=1, sequence_parallel=False)
    with pytest.raises(FoldingError, match=r"^seq-len=100 is not divisible by 2 x CP = 2 x 4 = 8"):
        check_sequence_length(100, spec)
    check_sequence_length(4096, spec)


# ------------------------------------------------------------------------------ the kernel
def _reference(q, k, v, scale, q_pos, k_pos):
    """Autograd float64 attention in Megatron's layout: q [sq, b, H, d], k/v [sk, b, G, d]."""
    repeat = q.shape[2] // k.shape[2]
    qh = q.permute(1, 2, 0, 3)
    kh = k.repeat_interleave(repeat, 2).permute(1, 2, 0, 3)
    vh = v.repeat_interleave(repeat, 2).permute(1, 2, 0, 3)
    scores = qh @ kh.transpose(-1, -2) * scale
    if q_pos is not None:
        scores = scores.masked_fill(k_pos.view(1, -1) > q_pos.view(-1, 1), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ vh, lse  # [b, H, sq, d], [b, H, sq]


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


KERNEL_CASES = {
    "mha": dict(heads=4, groups=4, positions=None),
    "gqa": dict(heads=6, groups=2, positions=None),
    "mha causal": dict(heads=4, groups=4, positions="causal"),
    "gqa layout": dict(heads=8, groups=4, positions="layout"),
}


def _positions(kind, sq, sk, generator):
    if kind is None:
        return None, None
    if kind == "causal":  # queries the last sq of sk contiguous keys
        return torch.arange(sk - sq, sk), torch.arange(sk)
    # a rank's queries (CP 2, rank 1 of 2 x 24 tokens) over keys in gathered order
    q_pos = rank_positions(2 * sk, 2, 1)[:sq]
    k_pos = torch.cat([rank_positions(2 * sk, 2, 0), rank_positions(2 * sk, 2, 1)])[:sk]
    return q_pos, k_pos[torch.randperm(sk, generator=generator)]


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_block_forward_and_backward_equal_autograd(name):
    c = KERNEL_CASES[name]
    g = torch.Generator().manual_seed(3)
    sq, sk, b, d = 12, 24, 2, 8
    q = torch.randn(sq, b, c["heads"], d, generator=g)
    k = torch.randn(sk, b, c["groups"], d, generator=g)
    v = torch.randn(sk, b, c["groups"], d, generator=g)
    dout = torch.randn(b, c["heads"], sq, d, generator=g)
    q_pos, k_pos = _positions(c["positions"], sq, sk, g)
    if q_pos is not None:
        q_pos = torch.maximum(q_pos, k_pos.min())  # every query sees at least one key
    scale = 1 / math.sqrt(d)

    out, lse = block_forward(q, k, v, scale, q_pos, k_pos)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = _reference(*leaves, scale, q_pos, k_pos)
    ref_out.backward(dout.double())
    assert out.dtype == lse.dtype == torch.float32
    assert _rel(out, ref_out.detach()) < TOLERANCE and _rel(lse, ref_lse.detach()) < TOLERANCE

    dq, dk, dv = block_backward(dout, out, lse, q, k, v, scale, q_pos, k_pos)
    assert dq.shape == (b, c["heads"], sq, d) and dk.shape == dv.shape == (b, c["groups"], sk, d)
    for got, leaf in zip((dq, dk, dv), leaves):
        assert _rel(got, leaf.grad.permute(1, 2, 0, 3)) < TOLERANCE, name


def test_merged_blocks_equal_one_block_and_their_backward_sums():
    """Keys split in two blocks: outputs merged through the log-sum-exp equal attention over all
    keys, and each block's backward with the merged output and lse sums to the whole gradient."""
    g = torch.Generator().manual_seed(5)
    sq, sk, b, h, n, d = 10, 20, 1, 4, 2, 8
    q, dout = torch.randn(sq, b, h, d, generator=g), torch.randn(b, h, sq, d, generator=g)
    k, v = torch.randn(sk, b, n, d, generator=g), torch.randn(sk, b, n, d, generator=g)
    q_pos, k_pos = torch.arange(12, 22), torch.arange(sk)  # every query sees keys of both blocks
    whole, whole_lse = block_forward(q, k, v, 0.3, q_pos, k_pos)
    out, lse = merge(*block_forward(q, k[:12], v[:12], 0.3, q_pos, k_pos[:12]),
                     *block_forward(q, k[12:], v[12:], 0.3, q_pos, k_pos[12:]))
    assert _rel(out, whole) < TOLERANCE and _rel(lse, whole_lse) < TOLERANCE
    dq, dk, dv = block_backward(dout, whole, whole_lse, q, k, v, 0.3, q_pos, k_pos)
    first = block_backward(dout, out, lse, q, k[:12], v[:12], 0.3, q_pos, k_pos[:12])
    second = block_backward(dout, out, lse, q, k[12:], v[12:], 0.3, q_pos, k_pos[12:])
    assert _rel(first[0] + second[0], dq) < TOLERANCE
    assert _rel(torch.cat([first[1], second[1]], 2), dk) < TOLERANCE
    assert _rel(torch.cat([first[2], second[2]], 2), dv) < TOLERANCE


# ------------------------------------------------------- 4 ranks against Megatron's attention
SHAPE = AttentionShape(seq_length=4096, batch=1, heads=8, groups=4, head_dim=16, dtype="fp32")
CP = 4
CASES = [Case(CP, mode) for mode in MODES] + [Case(1, "p2p", tensors=False, backward=False)]


@pytest.fixture(scope="module")
def measured():
    """One spawn: every mode at CP 4, the ring's forward at CP 1 (rank 0 alone, a sub-group of
    the same spawn), then Megatron's DotProductAttention on the whole sequence on rank 0."""
    from folding.run.launch import run_ranks

    per_rank = run_ranks(measure_rank, CP, SHAPE, CASES, True, timeout_s=600)
    cases = {(c.cp, c.mode): [r["cases"][i] for r in per_rank] for i, c in enumerate(CASES)}
    return cases, per_rank[0]["reference"]


def _errors(ranks, reference, positions=None):
    full = assemble(ranks, SHAPE.seq_length, positions)
    return {name: relative_error(full[name], reference[name]) for name in full}


@pytest.mark.megatron
@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_outputs_and_gradients_equal_megatron_dot_product_attention(measured, mode):
    cases, reference = measured
    errors = _errors(cases[CP, mode], reference)
    assert max(errors.values()) <= TOLERANCE, (mode, errors)


@pytest.mark.megatron
@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_counted_bytes_equal_the_formula(measured, mode):
    cases, _ = measured
    predicted = exchange_bytes(mode, **SHAPE.cost_kwargs(CP))
    for r in cases[CP, mode]:
        counted = (r["forward_bytes"], r["backward_bytes"])
        assert counted == (predicted.forward, predicted.backward), (mode, r["cp_rank"], r["calls"])


@pytest.mark.megatron
@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_bytes_kept_for_backward_equal_the_prediction(measured, mode):
    cases, _ = measured
    predicted = saved_bytes(mode=mode, **SHAPE.cost_kwargs(CP))
    for r in cases[CP, mode]:
        assert r["saved_bytes"] == predicted, (mode, r["cp_rank"], r["saved_tensors"])


@pytest.mark.megatron
@pytest.mark.multiprocess
@pytest.mark.slow
def test_ring_keeps_a_quarter_of_the_keys_and_values_of_cp1(measured):
    cases, _ = measured
    (one,) = [r for r in cases[1, "p2p"] if r is not None]
    kv = {cp: attention_bytes(**SHAPE.cost_kwargs(cp)).kv for cp in (1, CP)}
    assert one["saved_kv_bytes"] == kv[1]
    assert one["saved_bytes"] == saved_bytes(**SHAPE.cost_kwargs(1))
    for r in cases[CP, "p2p"]:
        assert r["saved_kv_bytes"] == kv[CP] and CP * r["saved_kv_bytes"] == one["saved_kv_bytes"]
        assert CP * r["saved_bytes"] == one["saved_bytes"]


@pytest.mark.megatron
@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_wrong_layout_fails_the_check(measured):
    """The same results put at another rank's positions, or at a plain contiguous split's, are
    far from Megatron's: the check can fail."""
    cases, reference = measured
    ranks = cases[CP, "p2p"]
    shifted = [ranks[(i + 1) % CP]["positions"] for i in range(CP)]
    L = SHAPE.seq_length // CP
    contiguous = [np.arange(i * L, (i + 1) * L) for i in range(CP)]
    for positions in (shifted, contiguous):
        errors = _errors(ranks, reference, positions)
        assert min(errors.values()) > 100 * TOLERANCE, errors


@pytest.mark.megatron
@pytest.mark.multiprocess
def test_a_cp_group_of_one_rank_sends_nothing_and_equals_megatron():
    """CP 1 in every mode (a group of one rank): forward and backward run, nothing is sent, the
    kept bytes are the prediction's and the results are Megatron's (seq 256, one rank)."""
    from folding.run.launch import run_ranks

    shape = AttentionShape(seq_length=256, batch=2, heads=4, groups=2, head_dim=8)
    cases = [Case(1, mode) for mode in MODES]
    (result,) = run_ranks(measure_rank, 1, shape, cases, True, timeout_s=300)
    for case, r in zip(cases, result["cases"]):
        assert (r["forward_bytes"], r["backward_bytes"]) == (0, 0), (case.mode, r["calls"])
        assert r["saved_bytes"] == saved_bytes(mode=case.mode, **shape.cost_kwargs(1)), case.mode
        full = assemble([r], shape.seq_length)
        errors = {k: relative_error(full[k], result["reference"][k]) for k in full}
        assert max(errors.values()) <= TOLERANCE, (case.mode, errors)
