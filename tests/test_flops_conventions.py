"""FLOPs conventions counted by hand on a two-layer model (the Megatron convention itself is
checked against megatron.training in test_flops_megatron.py)."""

from __future__ import annotations

import pytest

from folding.cost.flops import CONVENTIONS, flops_terms, layer_counts, training_flops
from folding.errors import FoldingError
from folding.recipe import ModelArch

# 2 layers, hidden 64, 4 heads of 16, multi-head attention, GELU MLP of 128, vocabulary 128
# (already a multiple of 128), LayerNorm-free RMSNorm; 2 sequences of 32 tokens = 64 tokens.
TINY = ModelArch(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128,
                 ffn_hidden_size=128, swiglu=False)
TOKENS, SEQ, BATCH = 64, 32, 2

ATTENTION_LINEAR = 6 * (64 * (64 + 64 + 64) + 64 * 64)   # QKV and output projection, x3 fwd/bwd x2 FMA
CORE_PER_POSITION = 6 * 64                                  # 2 GEMMs x causal half x 6
MLP = 6 * 64 * 128 * 2                                      # fc1 and fc2
LOGITS = 6 * 64 * 128
MEGATRON = TOKENS * (2 * (ATTENTION_LINEAR + MLP) + LOGITS) + TOKENS * SEQ * CORE_PER_POSITION * 2


def test_megatron_convention_by_hand():
    assert training_flops(TINY, SEQ, BATCH) == MEGATRON == 29_884_416


def test_full_attention_doubles_core_attention_only():
    core = TOKENS * SEQ * CORE_PER_POSITION * 2
    assert training_flops(TINY, SEQ, BATCH, convention="full-attention") == MEGATRON + core


def test_palm_six_n_plus_twelve_lhqt():
    # N: per layer 4 h^2 attention + 2 h ffn MLP + two norms; final norm; output layer.
    n = 2 * (4 * 64 * 64 + 2 * 64 * 128 + 2 * 64) + 64 + 128 * 64
    per_token = 6 * n + 12 * 2 * 4 * 16 * SEQ
    assert training_flops(TINY, SEQ, BATCH, convention="palm") == TOKENS * per_token == 31_580_160


def test_router_convention_adds_the_router_gemm():
    moe = ModelArch(**{**TINY.__dict__, "num_experts": 4, "moe_router_topk": 1, "moe_ffn_hidden_size": 32})
    extra = TOKENS * 2 * 6 * 64 * 4        # 2 MoE layers, h x experts
    assert training_flops(moe, SEQ, BATCH, convention="router") == training_flops(moe, SEQ, BATCH) + extra
    assert flops_terms(moe, SEQ, BATCH).routed_experts == TOKENS * 2 * 6 * 64 * 32 * 1 * 2


def test_mtp_layers_count_as_layers_of_the_last_kind():
    moe = ModelArch(**{**TINY.__dict__, "num_experts": 4, "moe_layer_freq": [1, 0], "mtp_num_layers": 2})
    counts = layer_counts(moe)
    assert (counts.attention, counts.dense_mlp, counts.moe, counts.mtp) == (4, 3, 1, 2)


def test_every_convention_is_labelled_and_unknown_ones_refused():
    assert set(CONVENTIONS) == {"megatron", "full-attention", "router", "palm"}
    with pytest.raises(FoldingError):
        training_flops(TINY, SEQ, BATCH, convention="6nd")
