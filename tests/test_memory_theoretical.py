"""Weight and optimizer bytes against megatron.training's theoretical_memory_usage.

Where Megatron's estimator and ours model the same thing (one pipeline stage, untied
embeddings, no biases or query/key norms, bf16 with fp32 gradients and Adam, shard sizes that
divide evenly) the two must agree; README.md lists where they differ. Runs in the
megatron-core 0.19.2 job (0.16.1's wheel has no megatron/training).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from folding.cost.memory import weight_memory
from folding.layout.parameters import ParameterModel, padded_vocab_size
from folding.mesh import FoldingSpec
from folding.recipe import ModelArch, TrainingSetup

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def theoretical():
    module = pytest.importorskip(
        "megatron.training.theoretical_memory_usage",
        reason="megatron.training is not installed (megatron-core 0.16.1's wheel has no "
               "megatron/training; the megatron-core 0.19.2 job runs this)")
    return module.compute_weight_and_optimizer_memory


def megatron_args(a: ModelArch, spec: FoldingSpec, distributed: bool):
    return SimpleNamespace(
        num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        kv_channels=a.head_dim, group_query_attention=a.num_query_groups is not None,
        num_query_groups=a.num_query_groups, num_experts=a.num_experts, swiglu=a.swiglu,
        moe_shared_expert_intermediate_size=a.moe_shared_expert_intermediate_size,
        moe_layer_freq=a.moe_layer_freq,
        # validate_args sets moe_ffn_hidden_size to ffn_hidden_size when it is left out
        moe_ffn_hidden_size=a.moe_ffn_hidden_size or a.ffn_hidden_size,
        moe_router_topk=a.moe_router_topk, moe_latent_size=None, mtp_num_layers=None,
        normalization=a.normalization, multi_latent_attention=False, ffn_hidden_size=a.ffn_hidden_size,
        padded_vocab_size=padded_vocab_size(a, spec.tp), untie_embeddings_and_output_weights=True,
        add_bias_linear=False, moe_shared_expert_gate=False,
        expert_tensor_parallel_size=spec.etp, expert_model_parallel_size=spec.ep,
        pipeline_model_parallel_size=spec.pp, tensor_model_parallel_size=spec.tp,
        world_size=spec.world_size, data_parallel_size=spec.dp,
        use_distributed_optimizer=distributed)


MIXTRAL_LIKE = ModelArch(num_layers=4, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
                         vocab_size=32000, ffn_hidden_size=3584, num_experts=8, moe_router_topk=2)
QWEN_LIKE = ModelArch(num_layers=4, hidden_size=896, num_attention_heads=14, num_query_groups=2,
                      vocab_size=151936, ffn_hidden_size=4864, num_experts=64, moe_router_topk=8,
                      moe_ffn_hidden_size=256, moe_shared_expert_intermediate_size=2048,
                      moe_layer_freq=[1, 1, 0, 1])

CASES = [
    (MIXTRAL_LIKE, dict(world_size=8, tp=2, ep=8, etp=1), True),
    (MIXTRAL_LIKE, dict(world_size=16, tp=1, ep=4, etp=1), True),
    (MIXTRAL_LIKE, dict(world_size=8, tp=2, ep=2, etp=2), False),
    (QWEN_LIKE, dict(world_size=32, tp=2, ep=16, etp=1), True),
    (QWEN_LIKE, dict(world_size=64, tp=1, ep=64, etp=1), True),
    (ModelArch(num_layers=2, hidden_size=512, num_attention_heads=8, vocab_size=1000,
               ffn_hidden_size=2048, swiglu=False), dict(world_size=8, tp=4), True),
]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_weight_and_optimizer_bytes_equal_megatrons_estimate(theoretical, index):
    a, degrees, distributed = CASES[index]
    spec = FoldingSpec(**degrees, num_experts=a.num_experts, num_layers=a.num_layers,
                       num_attention_heads=a.num_attention_heads, num_query_groups=a.query_groups)
    training = TrainingSetup(seq_length=4096, use_distributed_optimizer=distributed)
    ours = weight_memory(ParameterModel(a).rank_counts(spec, 0), spec, training).total
    theirs = theoretical(megatron_args(a, spec, distributed))
    assert math.isclose(ours, theirs, rel_tol=1e-9)


def test_a_wrong_sharding_differs(theoretical):
    """Sharding the expert optimizer state over the wrong group breaks the agreement."""
    a, degrees, distributed = CASES[0]
    spec = FoldingSpec(**degrees, num_experts=a.num_experts)
    theirs = theoretical(megatron_args(a, spec, distributed))
    wrong = FoldingSpec(world_size=8, tp=2, ep=4, etp=1)  # EDP 2 where the real EDP is 1
    ours = weight_memory(ParameterModel(a).rank_counts(spec, 0), wrong, TrainingSetup(seq_length=4096))
    assert not math.isclose(ours.total, theirs, rel_tol=1e-6)
