"""Every recipe: valid under the mesh rules, the published parameter counts, fits in memory, and
its pretrain_gpt.py flags are accepted by Megatron and describe the same model."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from contextlib import redirect_stdout

import pytest

from folding.cost.flops import training_flops
from folding.cost.hardware import H100_SXM, H200_SXM
from folding.cost.memory import ActivationOptions, peak_memory
from folding.errors import FoldingError
from folding.layout.parameters import ParameterModel
from folding.megatron.flags import launch_environment, recipe_flags
from folding.mesh import FoldingSpec
from folding.recipe import list_recipes, load_recipe

RECIPES = list_recipes()
GPU_RECIPES = {"mixtral-8x7b": H100_SXM, "mixtral-8x22b": H100_SXM, "qwen2-57b-a14b": H100_SXM,
               "qwen3-30b-a3b": H100_SXM, "deepseek-v3": H200_SXM}

# Total and per-token (active) parameters as the model authors publish them, in billions:
# Mistral AI's Mixtral announcements (46.7B/12.9B, 141B/39B), the Qwen2 technical report
# (57B/14B), the Qwen3-30B-A3B model card (30.5B/3.3B) and the DeepSeek-V3 technical report
# (671B/37B without the 14B multi-token-prediction module).
PUBLISHED = {"mixtral-8x7b": (46.7, 12.9), "mixtral-8x22b": (141, 39), "qwen2-57b-a14b": (57, 14),
             "qwen3-30b-a3b": (30.5, 3.3), "deepseek-v3": (671, 37)}


def test_the_required_recipes_exist():
    assert set(GPU_RECIPES) | {"tiny-moe"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_folding_passes_the_mesh_rules(name):
    r = load_recipe(name)
    again = FoldingSpec(**{k: v for k, v in dataclasses.asdict(r.folding).items()})
    assert again == r.folding
    assert r.source or name.startswith("tiny-moe")  # the toys have no published architecture


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_totals(name):
    arch = dataclasses.replace(load_recipe(name).model, mtp_num_layers=None)
    counts = ParameterModel(arch).model_counts()
    active = counts.dense + counts.embedding + counts.expert * arch.moe_router_topk // arch.num_experts
    total_b, active_b = PUBLISHED[name]
    assert counts.total / 1e9 == pytest.approx(total_b, rel=0.02)
    assert active / 1e9 == pytest.approx(active_b, rel=0.04)


@pytest.mark.parametrize("name", sorted(GPU_RECIPES))
def test_recipe_fits_its_gpu(name):
    r, hw = load_recipe(name), GPU_RECIPES[name]
    memory = peak_memory(r.model, r.training, r.folding)
    assert memory.total <= (hw.memory_gb - hw.reserved_gb) * 1e9


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-moe-long"])
def test_tiny_moe_fits_with_unfused_cpu_attention(name):
    r = load_recipe(name)
    memory = peak_memory(r.model, r.training, r.folding, ActivationOptions(attention_kernel="unfused"))
    assert 0 < memory.total < 1e9


def test_a_recipe_that_does_not_fit_is_caught():
    r = load_recipe("mixtral-8x22b")
    crowded = r.folding.with_degrees(pp=2, vpp=None, ep=8, dp=None, edp=None, world_size=128)
    assert peak_memory(r.model, r.training, crowded).total > (80 - 4) * 1e9


# ----------------------------------------------------------------------------- flags


@pytest.fixture
def megatron_flops(megatron_arguments):
    """Megatron's argument parser, FLOPs count and vocabulary padding."""
    training = pytest.importorskip("megatron.training.training")
    vocab = pytest.importorskip("megatron.training.vocab_utils")
    return megatron_arguments, training.num_floating_point_operations, vocab.calculate_padded_vocab_size


# A recipe trained with the folded dispatcher has no pretrain_gpt.py flags of its own (it runs
# through folding's runtime); test_flags_of_a_folded_recipe_are_refused checks that.
MEGATRON_RECIPES = [n for n in RECIPES
                    if load_recipe(n).training.moe_token_dispatcher_type != "folded"]


def test_flags_of_a_folded_recipe_are_refused():
    from folding.errors import FoldingError

    assert "tiny-moe-32e" in set(RECIPES) - set(MEGATRON_RECIPES)
    with pytest.raises(FoldingError, match="pretrain_gpt.py has no flag for it"):
        recipe_flags(load_recipe("tiny-moe-32e"))


@pytest.mark.megatron
@pytest.mark.parametrize("name", MEGATRON_RECIPES)
def test_flags_parse_validate_and_give_the_same_flops(name, megatron_flops, monkeypatch):
    arguments, flops_fn, pad_vocab = megatron_flops
    r = load_recipe(name)
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py"] + recipe_flags(r))
    for key, value in launch_environment(r.folding).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WORLD_SIZE", str(r.folding.world_size))
    with redirect_stdout(io.StringIO()):
        args = arguments.parse_args()
        arguments.validate_args(args)
    f, m, t = r.folding, r.model, r.training
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.context_parallel_size, args.data_parallel_size) == (f.tp, f.pp, f.cp, f.dp)
    assert args.virtual_pipeline_model_parallel_size == f.vpp
    assert bool(args.sequence_parallel) == f.sequence_parallel
    if m.num_experts:
        assert (args.expert_model_parallel_size, args.expert_tensor_parallel_size,
                args.num_experts, args.moe_router_topk) == (f.ep, f.etp, m.num_experts, m.moe_router_topk)
    assert (args.micro_batch_size, args.global_batch_size, args.seq_length) == (
        t.micro_batch_size, t.global_batch_size, t.seq_length)
    args.padded_vocab_size = pad_vocab(args.vocab_size, args.make_vocab_size_divisible_by,
                                       args.tensor_model_parallel_size, logging_enabled=False)
    assert flops_fn(args, t.global_batch_size) == pytest.approx(
        training_flops(m, t.seq_length, t.global_batch_size, f.tp), rel=1e-12)


@pytest.mark.megatron
def test_flags_of_a_changed_model_give_other_flops(megatron_flops, monkeypatch):
    """The end-to-end check can fail: flags of a recipe with top-k 3 against our top-k 2."""
    arguments, flops_fn, pad_vocab = megatron_flops
    r = load_recipe("mixtral-8x7b")
    changed = dataclasses.replace(r, model=dataclasses.replace(r.model, moe_router_topk=3))
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py"] + recipe_flags(changed))
    with redirect_stdout(io.StringIO()):
        args = arguments.parse_args()
    args.padded_vocab_size = pad_vocab(32000, 128, 1, logging_enabled=False)
    args.kv_channels = 128
    assert flops_fn(args, 256) != training_flops(r.model, 4096, 256, 1)


def test_unrepresentable_order_is_refused():
    r = load_recipe("mixtral-8x22b")
    odd = dataclasses.replace(r, folding=r.folding.with_degrees(order="tp-ep-cp-dp-pp"))
    with pytest.raises(FoldingError, match="no Megatron flag"):
        recipe_flags(odd)


def test_cli_flags_text_and_json(cli):
    code, out, err = cli("flags", "--recipe", "deepseek-v3", "--json")
    assert code == 0, err
    data = json.loads(out)
    flags = data["flags"]
    assert flags[flags.index("--moe-layer-freq") + 1] == "([0]*3+[1]*58)"
    assert "--multi-latent-attention" in flags and data["env"] == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    code, out, _ = cli("flags", "--recipe", "qwen2-57b-a14b")
    assert code == 0
    assert "--num-layers-per-virtual-pipeline-stage 1 \\" in out
    code, _, err = cli("flags", "--recipe", "no-such-model")
    assert code == 2 and err.count("\n") == 1
