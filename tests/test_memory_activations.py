"""Activation memory against hand counts and the published per-layer formula.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
arXiv 2205.05198, section 4 and table 2) count, for a GPT layer with LayerNorm, GELU, a 4h MLP,
dropout, unfused attention and 16-bit activations, 34 s b h / t + 5 a s^2 b / t bytes per layer
with tensor and sequence parallelism t and no recomputation, 34 s b h / t with selective
recomputation and 2 s b h / t with full recomputation. Their count leaves out the norms'
per-token statistics, added here by hand (LayerNorm keeps an fp32 mean and rstd per token).

The check against activations measured on real tiny models running on CPU is in
test_memory_runtime.py.
"""

from __future__ import annotations

import pytest

from folding.cost.memory import (ActivationOptions, dispatcher_buffer_bytes,
                                 in_flight_micro_batches, layer_activation_bytes, stage_memory,
                                 token_shape)
from folding.mesh import FoldingSpec
from folding.recipe import ModelArch, TrainingSetup

S, B, H, HEADS, T = 2048, 2, 1024, 16, 4

GPT = ModelArch(num_layers=8, hidden_size=H, num_attention_heads=HEADS, vocab_size=51200,
                ffn_hidden_size=4 * H, swiglu=False, normalization="LayerNorm",
                attention_dropout=0.1, hidden_dropout=0.1)
UNFUSED = ActivationOptions(attention_kernel="unfused")


def korthikanti_spec():
    return FoldingSpec(world_size=T, tp=T, num_attention_heads=HEADS)


def training(**kw):
    return TrainingSetup(seq_length=S, micro_batch_size=B, global_batch_size=B, **kw)


def norm_statistics(tp):
    return 2 * (S * B // tp) * 2 * 4  # two norms, s*b/t tokens, mean and rstd in fp32


@pytest.mark.parametrize("recompute, expected", [
    ("none", 34 * S * B * H // T + 5 * HEADS * S * S * B // T + norm_statistics(T)),
    ("selective", 34 * S * B * H // T + norm_statistics(T)),
    ("full", 2 * S * B * H // T),
])
def test_dense_layer_equals_korthikanti(recompute, expected):
    got = layer_activation_bytes(GPT, training(recompute=recompute), korthikanti_spec(), False,
                                 UNFUSED)
    assert got == expected


def test_without_sequence_parallelism_norms_and_dropout_are_replicated():
    """Table 2, tensor parallel without sequence parallel: s b h (10 + 24 / t) + 5 a s^2 b / t."""
    spec = FoldingSpec(world_size=T, tp=T, sequence_parallel=False)
    got = layer_activation_bytes(GPT, training(), spec, False, UNFUSED)
    assert got == S * B * H * (10 + 24 // T) + 5 * HEADS * S * S * B // T + norm_statistics(1)


def test_a_wrong_count_fails_the_check():
    """The same check with GELU swapped for SwiGLU (fc1 output doubles) must not hold."""
    swiglu = ModelArch(**{**GPT.__dict__, "swiglu": True})
    got = layer_activation_bytes(swiglu, training(), korthikanti_spec(), False, UNFUSED)
    assert got != 34 * S * B * H // T + 5 * HEADS * S * S * B // T + norm_statistics(T)


# ----------------------------------------------------------------------------- MoE by hand
TINY = ModelArch(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 vocab_size=256, ffn_hidden_size=256, num_experts=4, moe_router_topk=2,
                 moe_ffn_hidden_size=32)


def tiny_training(**kw):
    return TrainingSetup(**{"seq_length": 128, "micro_batch_size": 1, "global_batch_size": 8, **kw})


def test_moe_layer_by_hand():
    """TP2 (sequence parallel) EP4 ETP1, bf16, flash attention, RMSNorm, no dropout."""
    spec = FoldingSpec(world_size=8, tp=2, ep=4, etp=1, num_experts=4)
    h, tokens, sp, k, experts, ffn = 64, 128, 64, 2, 4, 32
    routed = sp * k  # each of the 64 local tokens goes to 2 experts; ETP1 gathers nothing
    attention = (sp * (h * 2 + 4)                 # input RMSNorm: input + rstd
                 + sp * h * 2                     # QKV input
                 + tokens * (64 + 2 * 32) // 2 * 2  # q (4 heads x 16), k and v (2 groups x 16), /TP
                 + tokens * 2 * 4                 # log-sum-exp: 2 local heads, fp32
                 + tokens * 64 // 2 * 2)          # attention output (4 heads x 16) / TP
    mlp = (sp * (h * 2 + 4) + sp * h * 2          # pre-MLP norm, its output (router/fc1 input)
           + sp * experts * 4 * 2 + sp * k * 8    # router scores and probabilities, top-k indices
           + routed * h * 2                       # expert fc1 inputs
           + routed * ffn * 3 * 2                 # SwiGLU input (2 ffn) and output (ffn)
           + routed * 4)  # router probability per expert token copy, applied before fc2
    got = layer_activation_bytes(TINY, tiny_training(precision="bf16"), spec, True)
    assert got == attention + mlp
    assert token_shape(TINY, tiny_training(), spec).expert_tokens == routed


def test_etp_gathers_and_capacity_caps_expert_tokens():
    spec = FoldingSpec(world_size=8, tp=2, ep=2, etp=2, num_experts=4)
    assert token_shape(TINY, tiny_training(), spec).expert_tokens == 64 * 2 * 2
    dropping = tiny_training(moe_expert_capacity_factor=0.5)
    assert token_shape(TINY, dropping, spec).expert_tokens == 128
    padded = tiny_training(moe_expert_capacity_factor=1.5, moe_pad_expert_input_to_capacity=True)
    assert token_shape(TINY, padded, spec).expert_tokens == 384
    skewed = token_shape(TINY, tiny_training(), spec, ActivationOptions(moe_load_imbalance=1.25))
    assert skewed.expert_tokens == 320


def test_context_parallel_divides_the_sequence():
    spec = FoldingSpec(world_size=4, cp=4)
    one = layer_activation_bytes(TINY, tiny_training(), FoldingSpec(world_size=1), False)
    assert layer_activation_bytes(TINY, tiny_training(), spec, False) == one // 4


def test_dispatcher_buffers_by_hand():
    spec = FoldingSpec(world_size=8, tp=2, ep=4, etp=1, num_experts=4)
    # permuted tokens and combine input at the source (64 x 2 each), 3 buffers of 128 at the expert
    assert dispatcher_buffer_bytes(TINY, tiny_training(precision="bf16"), spec) == \
        (2 * 128 + 3 * 128) * 64 * 2


# ----------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("pp, vpp", [(2, 2), (4, 2), (4, 7), (8, 7), (8, 4)])
def test_interleaved_first_stage_matches_megatrons_penalty(pp, vpp):
    """Megatron's theoretical_memory_usage: the first stage holds L (1 + (PP-1)/(PP VPP)) layers
    of activations with the interleaved schedule."""
    layers = pp * vpp * 3
    chunk_layers = layers // (pp * vpp)
    held = in_flight_micro_batches(pp, vpp, 0, num_microbatches=64) * chunk_layers
    assert held == pytest.approx(layers * (1 + (pp - 1) / (pp * vpp)))


def test_one_f_one_b_keeps_pp_minus_rank_micro_batches():
    assert [in_flight_micro_batches(4, None, r, 16) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_micro_batches(4, None, 0, 2) == 2
    assert in_flight_micro_batches(1, None, 0, 16) == 1


def test_first_stage_holds_the_most_activations():
    spec = FoldingSpec(world_size=4, pp=4, num_layers=4)
    first = stage_memory(TINY, tiny_training(global_batch_size=16), spec, 0)
    last = stage_memory(TINY, tiny_training(global_batch_size=16), spec, 3)
    assert first.in_flight == 4 and last.in_flight == 1
    assert first.details["layers"] == 4 * last.details["layers"]
    assert "output" in last.details and "output" not in first.details
