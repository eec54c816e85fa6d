"""Context-parallel cost: the bytes of each CP mode by hand and from tensor sizes, the saved
memory, the errors, and the planner's CP term built on them."""

from __future__ import annotations

import pytest
import torch

from folding.cost import comm
from folding.cost.context_parallel import (CPExchange, attention_bytes, exchange_bytes, formula,
                                           saved_bytes)
from folding.cost.hardware import H100_SXM
from folding.cost.step_time import StepTimeModel
from folding.errors import FoldingError
from folding.mesh import CP_COMM_TYPES, FoldingSpec
from folding.recipe import ModelArch, TrainingSetup

# L = 8 / 2 = 4 tokens, H = 4, G = 2, d = 4, bf16: KV = 2*4*1*2*4*2 = 128, Q = 4*1*4*4*2 = 128
SMALL = dict(seq_length=8, micro_batch_size=1, num_attention_heads=4, num_query_groups=2,
             head_dim=4, tp=1, cp=2, element_bytes=2)
# TP 2, CP 4: H = 8, G = 4, L = 16, b = 2, d = 8: KV = 2*16*2*4*8*2 = 4096, Q = 16*2*8*8*2 = 4096
LARGER = dict(seq_length=64, micro_batch_size=2, num_attention_heads=16, num_query_groups=8,
              head_dim=8, tp=2, cp=4, element_bytes=2)


@pytest.mark.parametrize("mode, expected", [
    ("p2p", CPExchange(128, 384)),            # (CP-1) KV, (2CP-1) KV
    ("all_gather", CPExchange(128, 256)),     # (CP-1) KV, 2 (CP-1) KV
    ("a2a", CPExchange(192, 192)),            # (CP-1)/CP (2Q + KV) = (256 + 128) / 2
])
def test_exchange_bytes_by_hand_cp2(mode, expected):
    got = exchange_bytes(mode, **SMALL)
    assert got == expected and isinstance(got.forward, int) and isinstance(got.backward, int)
    assert got.total == expected.forward + expected.backward


@pytest.mark.parametrize("mode, expected", [
    ("p2p", CPExchange(3 * 4096, 7 * 4096)),
    ("all_gather", CPExchange(3 * 4096, 6 * 4096)),
    ("a2a", CPExchange(3 * (2 * 4096 + 4096) // 4, 3 * (2 * 4096 + 4096) // 4)),
])
def test_exchange_bytes_by_hand_tp2_cp4(mode, expected):
    assert exchange_bytes(mode, **LARGER) == expected


def test_bytes_equal_those_of_real_tensors():
    """KV and Q from the shapes a rank holds; a2a sends all but its own 1/CP of each tensor;
    the ring moves whole K/V blocks."""
    p = LARGER
    L, b = p["seq_length"] // p["cp"], p["micro_batch_size"]
    H, G = p["num_attention_heads"] // p["tp"], p["num_query_groups"] // p["tp"]
    d, cp = p["head_dim"], p["cp"]
    q = torch.empty(L, b, H, d, dtype=torch.bfloat16)
    k = torch.empty(L, b, G, d, dtype=torch.bfloat16)
    v = torch.empty_like(k)
    o = torch.empty_like(q)
    nbytes = lambda t: t.numel() * t.element_size()
    sizes = attention_bytes(**p)
    assert (sizes.q, sizes.kv, sizes.out) == (nbytes(q), nbytes(k) + nbytes(v), nbytes(o))
    assert exchange_bytes("p2p", **p).forward == (cp - 1) * (nbytes(k) + nbytes(v))
    sent = sum(nbytes(chunk) for t in (q, k, v, o) for chunk in t.chunk(cp, dim=2)[1:])
    assert exchange_bytes("a2a", **p).forward == sent


def test_value_head_dim():
    """Multi-latent attention: K/V per head with a value head dimension of its own."""
    p = dict(SMALL, num_query_groups=4, value_head_dim=2)
    t = attention_bytes(**p)
    assert (t.q, t.kv, t.out) == (4 * 4 * 4 * 2, 4 * 4 * (4 + 2) * 2, 4 * 4 * 2 * 2)
    assert exchange_bytes("a2a", **p).forward == (t.q + t.kv + t.out) // 2
    assert saved_bytes(**p) == t.q + t.kv + t.out + 4 * 4 * 4


@pytest.mark.parametrize("mode", CP_COMM_TYPES)
def test_cp1_moves_nothing(mode):
    assert exchange_bytes(mode, **dict(SMALL, cp=1)) == CPExchange(0, 0)
    assert exchange_bytes(mode, **dict(LARGER, cp=1)).total == 0


def test_saved_bytes_and_halving():
    # 2Q + KV + 4 L b H = 256 + 128 + 4*4*1*4
    assert saved_bytes(**SMALL) == 448
    cp2 = saved_bytes(**dict(LARGER, cp=2))
    cp4 = saved_bytes(**LARGER)
    assert cp2 == 2 * cp4
    assert cp4 == 2 * 4096 + 4096 + 4 * 16 * 2 * 8
    for mode in CP_COMM_TYPES:
        assert saved_bytes(mode=mode, **LARGER) == cp4


def test_a2a_needs_heads_and_groups_divisible_by_cp():
    with pytest.raises(FoldingError, match="a2a.*num_query_groups.*CP=4"):
        exchange_bytes("a2a", **dict(SMALL, cp=4))          # G = 2
    with pytest.raises(FoldingError, match="a2a.*num_attention_heads"):
        exchange_bytes("a2a", **dict(SMALL, num_attention_heads=6, num_query_groups=6, cp=4, seq_length=16))
    with pytest.raises(FoldingError, match="a2a"):
        saved_bytes(mode="a2a", **dict(SMALL, cp=4))
    # the other modes have no such rule
    assert exchange_bytes("p2p", **dict(SMALL, cp=4)).forward == 3 * 2 * 2 * 1 * 2 * 4 * 2


def test_unknown_mode_and_bad_sizes():
    with pytest.raises(FoldingError, match=r"'ring'.*p2p, all_gather, a2a"):
        exchange_bytes("ring", **SMALL)
    with pytest.raises(FoldingError, match="'ring'"):
        formula("ring")
    with pytest.raises(FoldingError, match="'ring'"):
        saved_bytes(mode="ring", **SMALL)
    with pytest.raises(FoldingError, match="CP=3 does not divide seq_length=8"):
        exchange_bytes("p2p", **dict(SMALL, cp=3))
    with pytest.raises(FoldingError, match="TP=3"):
        exchange_bytes("p2p", **dict(SMALL, tp=3))
    with pytest.raises(FoldingError, match="head_dim=0"):
        exchange_bytes("p2p", **dict(SMALL, head_dim=0))


def test_formulas_name_each_mode():
    assert formula("p2p") == "forward (CP-1)*KV, backward (2*CP-1)*KV"
    assert "2*(CP-1)*KV" in formula("all_gather")
    assert "(2Q+KV)" in formula("a2a")


# ----------------------------------------------------------------------------- planner term
MOE = ModelArch(num_layers=8, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
                vocab_size=32000, ffn_hidden_size=4096, num_experts=8, moe_router_topk=2)


def _spec(mode, cp=2, tp=1):
    return FoldingSpec(world_size=16, tp=tp, cp=cp, pp=1, ep=8, etp=1, num_experts=8,
                       num_layers=8, num_attention_heads=16, num_query_groups=4,
                       cp_comm_type=mode)


def _cp_term(model, spec, recompute="none"):
    return model.step_time(spec, 1, recompute).breakdown()["cp_per_microbatch"]


def test_planner_cp_term_positive_grows_with_sequence_and_differs_by_mode():
    short = StepTimeModel(MOE, TrainingSetup(seq_length=4096, global_batch_size=64), H100_SXM)
    long = StepTimeModel(MOE, TrainingSetup(seq_length=16384, global_batch_size=64), H100_SXM)
    terms = {}
    for mode in CP_COMM_TYPES:     # one model for all modes: the layer memo tells them apart
        terms[mode] = _cp_term(short, _spec(mode))
        assert terms[mode] > 0
        assert _cp_term(long, _spec(mode)) > terms[mode]
        assert _cp_term(short, _spec(mode, cp=1)) == 0
        assert _cp_term(short, _spec(mode), "full") > terms[mode]
    assert len(set(terms.values())) == 3
    # not overlapped: all_gather shows whole; the p2p ring hides its hops behind attention
    assert terms["p2p"] < terms["all_gather"]


def test_planner_p2p_and_all_gather_terms_by_hand():
    training = TrainingSetup(seq_length=4096, global_batch_size=64)
    model = StepTimeModel(MOE, training, H100_SXM)
    spec = _spec("all_gather")
    span = comm.group_spans(spec)[("attention", "cp")]
    kv = 2 * 2048 * 4 * 64 * 2                       # L = 2048, G = 4, d = 64, bf16
    one = comm.all_gather_time(2 * kv, span, H100_SXM)
    assert model._cp_time(spec, span, 1, "none", core=1.0) == pytest.approx(3 * one)
    assert model._cp_time(spec, span, 1, "full", core=1.0) == pytest.approx(4 * one)
    p2p = _spec("p2p")
    lat = comm.latency(span, H100_SXM)
    hop = comm.p2p_time(kv, False, H100_SXM)
    # compute hides every hop but the first latency and the last dK/dV hop home
    assert model._cp_time(p2p, span, 1, "none", core=1.0) == pytest.approx(2 * lat + hop)
    # with no compute to hide behind, every byte shows
    bare = (lat + hop) + (lat + comm.p2p_time(2 * kv, False, H100_SXM) + hop)
    assert model._cp_time(p2p, span, 1, "none", core=0.0) == pytest.approx(bare)
