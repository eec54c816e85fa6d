"""The weight layout: full -> shards -> full is bit-exact, and each rule slices as Megatron does."""

import dataclasses

import pytest
import torch

from folding.errors import FoldingError
from folding.layout.parameters import full_parameters
from folding.layout.weights import (full_to_local_names, join_slices, local_to_full_name,
                                    param_rule, shard, slice_for, unshard)
from folding.mesh import FoldingSpec
from folding.recipe import load_recipe

ARCH = load_recipe("tiny-moe").model  # 4 layers, 8 experts, 8 heads, 4 query groups, SwiGLU

FOLDINGS = [
    dict(world_size=8, tp=2, ep=4, etp=1),
    dict(world_size=8, tp=1, ep=8),
    dict(world_size=8, tp=4, ep=2, etp=2),
    dict(world_size=8, tp=2, ep=4, etp=2),
    dict(world_size=8, tp=2, pp=2, ep=4, etp=1),
    dict(world_size=8, tp=2, pp=2, vpp=2, ep=2, etp=2),
    dict(world_size=16, tp=4, pp=4, ep=2, etp=1),
    dict(world_size=16, tp=2, pp=2, vpp=2, ep=8, etp=1),
    dict(world_size=8, tp=1, pp=4, ep=2),
    dict(world_size=32, tp=4, pp=2, ep=8, etp=2),
]


def random_full(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in full_parameters(arch).items()}


@pytest.mark.parametrize("degrees", FOLDINGS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_round_trip_is_bit_exact(degrees):
    spec = FoldingSpec(**degrees, num_experts=ARCH.num_experts, num_layers=ARCH.num_layers)
    full = random_full(ARCH)
    shards = [shard(full, ARCH, spec, r) for r in range(spec.world_size)]
    back = unshard(shards, ARCH, spec)
    assert set(back) == set(full)
    for name in full:
        assert torch.equal(back[name], full[name]), name


def test_round_trip_with_dense_layers_and_shared_experts():
    arch = dataclasses.replace(ARCH, moe_layer_freq=[1, 0, 1, 0], moe_shared_expert_intermediate_size=64)
    spec = FoldingSpec(world_size=8, tp=2, pp=2, ep=2, etp=1, num_experts=8, num_layers=4)
    full = random_full(arch, seed=1)
    names = set(full)
    assert "decoder.layers.1.mlp.linear_fc1.weight" in names
    assert "decoder.layers.0.mlp.shared_experts.linear_fc1.weight" in names
    back = unshard([shard(full, arch, spec, r) for r in range(8)], arch, spec)
    assert all(torch.equal(back[n], full[n]) for n in names)


def test_every_parameter_lives_on_some_rank_and_shards_add_up():
    spec = FoldingSpec(world_size=8, tp=2, pp=2, vpp=2, ep=2, etp=2, num_experts=8, num_layers=4)
    full = random_full(ARCH)
    total_full = sum(t.numel() for t in full.values())
    # Each element is held by exactly the replicas its rule implies: count them independently.
    held = 0
    for r in range(8):
        held += sum(t.numel() for t in shard(full, ARCH, spec, r).values())
    replicated = {n: t.numel() for n, t in full.items() if param_rule(n, True).group is None}
    tp_split = {n: t.numel() for n, t in full.items() if param_rule(n, True).group == "tp"}
    etp_split = {n: t.numel() for n, t in full.items() if param_rule(n, True).group == "etp"}
    # Per PP stage there are TP x DP = 4 ranks; experts live on EP x ETP = 4 ranks (EDP = 1).
    assert held == (4 * sum(replicated.values()) + 2 * sum(tp_split.values()) + sum(etp_split.values()))
    assert total_full == sum(replicated.values()) + sum(tp_split.values()) + sum(etp_split.values())


def test_swiglu_fc1_takes_its_slice_of_both_halves():
    # Rows 0-3 are the gate, rows 4-7 the up projection; 2 ranks.
    full = torch.arange(8.0).unsqueeze(1)
    rule = param_rule("decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight", swiglu=True)
    assert rule.gated and rule.group == "etp"
    assert slice_for(full, rule, 0, 2).flatten().tolist() == [0, 1, 4, 5]
    assert slice_for(full, rule, 1, 2).flatten().tolist() == [2, 3, 6, 7]
    assert torch.equal(join_slices([slice_for(full, rule, i, 2) for i in range(2)], rule), full)


def test_rules_by_kind():
    assert param_rule("decoder.layers.3.self_attention.linear_qkv.weight", True).group == "tp"
    assert param_rule("decoder.layers.3.self_attention.linear_proj.weight", True).dim == 1
    assert param_rule("decoder.layers.3.mlp.router.weight", True).group is None
    assert param_rule("decoder.layers.3.mlp.experts.local_experts.7.linear_fc2.weight", True).dim == 1
    assert param_rule("decoder.layers.3.mlp.experts.linear_fc2.weight7", True).group == "etp"
    assert param_rule("embedding.word_embeddings.weight", True).group == "tp"
    assert param_rule("decoder.final_layernorm.weight", True).group is None


def test_names_follow_ep_ownership_and_interleaved_stages():
    spec = FoldingSpec(world_size=8, tp=1, pp=2, vpp=2, ep=4, num_experts=8, num_layers=4)
    # Rank 5: PP stage 1, EP rank 1 (ranks 4..7 form stage 1's EP group): experts 2 and 3.
    name = "decoder.layers.3.mlp.experts.local_experts.3.linear_fc1.weight"
    assert full_to_local_names(name, ARCH, spec, 5) == [(1, "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight")]
    assert full_to_local_names(name, ARCH, spec, 4) == []  # EP rank 0 holds experts 0 and 1
    assert full_to_local_names(name, ARCH, spec, 1) == []  # stage 0 holds layers 0 and 2
    assert local_to_full_name("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight",
                              ARCH, spec, 5, 1) == name
    assert full_to_local_names("output_layer.weight", ARCH, spec, 5) == [(1, "output_layer.weight")]
    assert full_to_local_names("embedding.word_embeddings.weight", ARCH, spec, 5) == []


def test_unshard_catches_a_diverged_replica_and_a_missing_slice():
    spec = FoldingSpec(world_size=8, tp=2, ep=4, etp=1, num_experts=8, num_layers=4)
    full = random_full(ARCH)
    shards = [shard(full, ARCH, spec, r) for r in range(8)]
    key = (0, "decoder.layers.0.input_layernorm.weight")
    shards[3][key] = shards[3][key] + 1e-6
    with pytest.raises(FoldingError, match="decoder.layers.0.input_layernorm.weight: ranks 0 and 3"):
        unshard(shards, ARCH, spec)
    shards = [shard(full, ARCH, spec, r) for r in range(8)]
    for r in range(0, 8, 2):  # every TP rank 0 loses its QKV slice
        del shards[r][(0, "decoder.layers.1.self_attention.linear_qkv.weight")]
    with pytest.raises(FoldingError, match=r"linear_qkv.weight: slices \[0\] are missing"):
        unshard(shards, ARCH, spec)
