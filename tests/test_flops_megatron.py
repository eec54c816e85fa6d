"""FLOPs per iteration against megatron.training's num_floating_point_operations.

Megatron's function is evaluated on an ``args`` namespace built here from the same ModelArch,
field by field (what validate_args would fill in is filled the way it does: kv_channels, the
padded vocabulary). Megatron computes in floats (its causal "/ 2" makes the result a float, and
figures above 2**53 round), so it is called twice: once with plain ints (the figure it prints,
compared to 1e-12) and once with every size a ``fractions.Fraction``, which runs the very same
code in exact arithmetic; that result must equal ours as an integer.

megatron-core 0.16.1's wheel has no megatron/training: these tests skip there and run in the
megatron-core 0.19.2 job.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction
from types import SimpleNamespace

import pytest

from folding.cost.flops import training_flops
from folding.recipe import ModelArch, list_recipes, load_recipe

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def megatron_training():
    training = pytest.importorskip(
        "megatron.training.training",
        reason="megatron.training is not installed (megatron-core 0.16.1's wheel has no "
               "megatron/training; the megatron-core 0.19.2 job runs this)")
    vocab_utils = pytest.importorskip("megatron.training.vocab_utils")
    return training.num_floating_point_operations, vocab_utils.calculate_padded_vocab_size


SIZE_FIELDS = ("hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
               "ffn_hidden_size", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
               "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
               "padded_vocab_size", "seq_length")


def megatron_args(a: ModelArch, seq_length: int, tp: int, pad_vocab, exact: bool):
    """The attributes num_floating_point_operations reads, as pretrain_gpt.py would set them."""
    args = SimpleNamespace(
        num_layers=a.num_layers, hidden_size=a.hidden_size,
        num_attention_heads=a.num_attention_heads,
        group_query_attention=a.num_query_groups is not None,
        num_query_groups=a.num_query_groups,
        kv_channels=a.kv_channels or a.hidden_size // a.num_attention_heads,
        ffn_hidden_size=a.ffn_hidden_size, swiglu=a.swiglu, num_experts=a.num_experts,
        moe_layer_freq=a.moe_layer_freq, moe_router_topk=a.moe_router_topk,
        moe_ffn_hidden_size=a.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=a.moe_shared_expert_intermediate_size,
        moe_latent_size=None, mtp_num_layers=a.mtp_num_layers,
        multi_latent_attention=a.multi_latent_attention, q_lora_rank=a.q_lora_rank,
        kv_lora_rank=a.kv_lora_rank, qk_head_dim=a.qk_head_dim,
        qk_pos_emb_head_dim=a.qk_pos_emb_head_dim, v_head_dim=a.v_head_dim,
        attention_output_gate=False, experimental_attention_variant=None,
        hybrid_layer_pattern=None, seq_length=seq_length,
        padded_vocab_size=pad_vocab(a.vocab_size, a.make_vocab_size_divisible_by, tp,
                                    logging_enabled=False),
    )
    if exact:
        for name in SIZE_FIELDS:
            value = getattr(args, name)
            if value is not None:
                setattr(args, name, Fraction(value))
    return args


def megatron_flops(megatron_training, a, seq_length, batch, tp):
    """(exact result as a Fraction, the float Megatron prints)."""
    flops_fn, pad_vocab = megatron_training
    exact = flops_fn(megatron_args(a, seq_length, tp, pad_vocab, exact=True), Fraction(batch))
    printed = flops_fn(megatron_args(a, seq_length, tp, pad_vocab, exact=False), batch)
    return Fraction(exact), printed


def grid():
    """(arch, seq_length, batch, tp) over the features Megatron's formula distinguishes."""
    base = dict(num_layers=6, hidden_size=512, num_attention_heads=8, vocab_size=32000,
                ffn_hidden_size=1408)
    attention = [dict(), dict(num_query_groups=2), dict(num_query_groups=1, kv_channels=96),
                 dict(kv_channels=80)]
    mlps = [dict(),
            dict(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=352),
            dict(num_experts=16, moe_router_topk=4, moe_ffn_hidden_size=256,
                 moe_shared_expert_intermediate_size=512),
            dict(num_experts=64, moe_router_topk=8, moe_layer_freq=2),
            dict(num_experts=8, moe_router_topk=1, moe_layer_freq=[0, 0, 1, 1, 1, 1],
                 moe_shared_expert_intermediate_size=704, mtp_num_layers=1)]
    shapes = [(128, 4, 1, True), (4096, 256, 2, False), (2048, 3, 8, True)]
    cases = []
    for (att, mlp), (seq, batch, tp, swiglu) in itertools.product(
            itertools.product(attention, mlps), shapes):
        cases.append((ModelArch(**{**base, **att, **mlp, "swiglu": swiglu}), seq, batch, tp))
    mla = dict(multi_latent_attention=True, kv_lora_rank=128, qk_head_dim=64,
               qk_pos_emb_head_dim=32, v_head_dim=64)
    for q_lora, mtp, freq, vocab in itertools.product((None, 96), (None, 2), (1, [0, 1, 1, 1, 1, 0]),
                                                     (32000, 129280)):
        cases.append((ModelArch(**{**base, **mla, "q_lora_rank": q_lora, "mtp_num_layers": mtp,
                                   "num_experts": 32, "moe_router_topk": 6,
                                   "moe_ffn_hidden_size": 128, "moe_layer_freq": freq,
                                   "moe_shared_expert_intermediate_size": 256,
                                   "vocab_size": vocab}), 1024, 8, 4))
    for name in list_recipes():
        r = load_recipe(name)
        cases.append((r.model, r.training.seq_length, r.training.global_batch_size, r.folding.tp))
    return cases


GRID = grid()


def test_grid_has_at_least_50_configurations():
    assert len(GRID) >= 50


@pytest.mark.parametrize("index", range(len(GRID)))
def test_flops_equal_megatron(megatron_training, index):
    a, seq, batch, tp = GRID[index]
    exact, printed = megatron_flops(megatron_training, a, seq, batch, tp)
    ours = training_flops(a, seq, batch, tp)
    assert isinstance(ours, int)
    assert exact.denominator == 1 and int(exact) == ours
    assert math.isclose(printed, ours, rel_tol=1e-12)


@pytest.mark.parametrize("change", [
    dict(moe_router_topk=3),
    dict(swiglu=False),
    dict(num_query_groups=4),
    dict(moe_shared_expert_intermediate_size=None),
    dict(mtp_num_layers=None),
])
def test_a_wrong_model_differs_from_megatron(megatron_training, change):
    """The comparison can fail: the same grid point with one field changed on our side only."""
    a, seq, batch, tp = next(c for c in GRID if c[0].num_experts and c[0].mtp_num_layers
                             and c[0].moe_shared_expert_intermediate_size
                             and not c[0].multi_latent_attention)
    exact, _ = megatron_flops(megatron_training, a, seq, batch, tp)
    wrong = training_flops(dataclasses.replace(a, **change), seq, batch, tp)
    assert wrong != exact


def test_other_conventions_differ_from_megatron(megatron_training):
    a, seq, batch, tp = GRID[5]
    exact, _ = megatron_flops(megatron_training, a, seq, batch, tp)
    for convention in ("full-attention", "router", "palm"):
        assert training_flops(a, seq, batch, tp, convention) != exact
