"""The Megatron-LM integration: the --folding-* flags, Megatron's arguments as a FoldingSpec, the
start-up mesh check on groups Megatron built, the folded decoder spec, and the patches in
patches/ (well formed, and calling only what the plugin has)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import io
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import megatron_training_shim  # noqa: F401 - the spawned ranks build through megatron.training
import numpy as np
import pytest

from folding.errors import FoldingError, InvalidFolding
from folding.megatron import plugin as megatron_plugin
from folding.mesh import FoldingSpec
from folding.placement.placement import Placement


ROOT = Path(__file__).resolve().parent.parent
PATCHES = sorted((ROOT / "patches").glob("megatron-lm-*.patch"))


def megatron_namespace(**changes) -> argparse.Namespace:
    """The Megatron arguments the plugin reads, as validate_args leaves them (tiny-moe's model,
    folded TP2 DP4 | ETP1 EP4 EDP2), with the --folding-* defaults."""
    args = megatron_plugin.add_arguments(argparse.ArgumentParser()).parse_args([])
    vars(args).update(
        world_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=1,
        context_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=4, expert_tensor_parallel_size=1, use_tp_pp_dp_mapping=False,
        num_layers=4, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8,
        group_query_attention=True, num_query_groups=4, num_experts=8, moe_layer_freq=1,
        sequence_parallel=True, padded_vocab_size=256, vocab_size=256, moe_grouped_gemm=False,
        moe_shared_expert_overlap=False, overlap_moe_expert_parallel_comm=False,
        moe_token_dispatcher_type="alltoall")
    vars(args).update(changes)
    return args


# ----------------------------------------------------------------------------- add_arguments
def test_add_arguments_parses_the_folding_flags():
    parser = megatron_plugin.add_arguments(argparse.ArgumentParser())
    defaults = parser.parse_args([])
    assert (defaults.folding_check_mesh, defaults.folding_dispatcher, defaults.folding_placement,
            defaults.folding_gpus_per_node) == (False, False, None, 8)
    args = parser.parse_args(["--folding-check-mesh", "--folding-dispatcher",
                              "--folding-placement", "p.json", "--folding-gpus-per-node", "4"])
    assert (args.folding_check_mesh, args.folding_dispatcher, args.folding_placement,
            args.folding_gpus_per_node) == (True, True, "p.json", 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["--folding-gpus-per-node", "four"])


def test_add_arguments_runs_the_next_provider_and_returns_its_parser():
    """pretrain_gpt.py chains ModelOpt's provider after ours; Megatron keeps what it returns."""
    seen = []

    def other(parser):
        seen.append(parser)
        parser.add_argument("--other-flag", action="store_true")
        return parser

    parser = argparse.ArgumentParser()
    assert megatron_plugin.add_arguments(parser, then=other) is parser and seen == [parser]
    assert parser.parse_args(["--other-flag", "--folding-dispatcher"]).other_flag


# ----------------------------------------------------------------------------- spec_from_args
def test_spec_from_a_namespace():
    spec = megatron_plugin.spec_from_args(megatron_namespace(folding_gpus_per_node=4))
    assert spec == FoldingSpec(world_size=8, tp=2, ep=4, etp=1, gpus_per_node=4, num_experts=8,
                               num_layers=4, num_attention_heads=8, num_query_groups=4,
                               sequence_parallel=True)
    assert (spec.dp, spec.edp) == (4, 2)


def test_spec_from_a_namespace_follows_megatrons_conventions():
    # --use-tp-pp-dp-mapping is Megatron's other rank order.
    spec = megatron_plugin.spec_from_args(megatron_namespace(
        use_tp_pp_dp_mapping=True, pipeline_model_parallel_size=2, expert_model_parallel_size=2))
    assert (spec.order, spec.dp, spec.edp) == ("tp-cp-ep-pp-dp", 2, 2)
    # ETP left out is TP, as in Megatron.
    spec = megatron_plugin.spec_from_args(megatron_namespace(expert_tensor_parallel_size=None))
    assert (spec.etp, spec.edp) == (2, 1)
    # Without --group-query-attention Megatron ignores --num-query-groups (its default is 1).
    spec = megatron_plugin.spec_from_args(megatron_namespace(group_query_attention=False,
                                                             num_query_groups=1))
    assert spec.num_query_groups is None
    # An uneven pipeline split is Megatron's to check: layers need not divide PP x VPP then.
    uneven = dict(num_layers=5, pipeline_model_parallel_size=2, expert_model_parallel_size=2)
    with pytest.raises(InvalidFolding, match="num_layers=5 is not divisible by PP=2"):
        megatron_plugin.spec_from_args(megatron_namespace(**uneven))
    spec = megatron_plugin.spec_from_args(megatron_namespace(
        **uneven, num_layers_in_first_pipeline_stage=3))
    assert spec.pp == 2 and spec.num_layers is None


@pytest.mark.parametrize("changes, degrees", [
    (dict(tensor_model_parallel_size=3), dict(tp=3)),
    (dict(expert_model_parallel_size=3, expert_tensor_parallel_size=1), dict(ep=3, etp=1)),
    (dict(sequence_parallel=False), dict(sequence_parallel=False)),
])
def test_a_bad_folding_is_refused_with_the_folding_spec_message(changes, degrees):
    with pytest.raises(InvalidFolding) as from_args:
        megatron_plugin.spec_from_args(megatron_namespace(**changes))
    facts = dict(world_size=8, tp=2, ep=4, etp=1, num_experts=8, num_layers=4,
                 num_attention_heads=8, num_query_groups=4, sequence_parallel=True)
    with pytest.raises(InvalidFolding) as direct:
        FoldingSpec(**{**facts, **degrees})
    assert str(from_args.value) == str(direct.value)


def _parse_with_megatron(arguments, monkeypatch, recipe, extra):
    from folding.megatron.flags import launch_environment, recipe_flags

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py"] + recipe_flags(recipe) + extra)
    for key, value in launch_environment(recipe.folding).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WORLD_SIZE", str(recipe.folding.world_size))
    with redirect_stdout(io.StringIO()):
        args = arguments.parse_args(extra_args_provider=megatron_plugin.add_arguments)
        arguments.validate_args(args)
    return args


@pytest.mark.megatron
@pytest.mark.parametrize("name, changes", [
    ("tiny-moe", {}), ("mixtral-8x22b", {}), ("qwen2-57b-a14b", {}),
    # --use-tp-pp-dp-mapping (pp not last) needs DP == EDP: EP2 ETP1 under TP2.
    ("qwen2-57b-a14b", dict(order="tp-cp-ep-pp-dp", ep=2, dp=None, edp=None))])
def test_spec_from_megatrons_own_parser(name, changes, megatron_arguments, monkeypatch):
    """Megatron's parse_args (with our flags as its extra provider) and validate_args, then
    spec_from_args: the recipe's folding, model facts included."""
    from folding.recipe import load_recipe

    recipe = load_recipe(name)
    recipe = dataclasses.replace(recipe, folding=recipe.folding.with_degrees(**changes))
    extra = ["--folding-check-mesh", "--folding-dispatcher", "--folding-gpus-per-node", "4"]
    args = _parse_with_megatron(megatron_arguments, monkeypatch, recipe, extra)
    assert args.folding_check_mesh and args.folding_dispatcher and args.folding_gpus_per_node == 4
    spec = megatron_plugin.spec_from_args(args)
    assert spec == recipe.folding.with_degrees(gpus_per_node=4)
    assert (spec.dp, spec.vpp) == (args.data_parallel_size, args.virtual_pipeline_model_parallel_size)


@pytest.mark.megatron
def test_megatrons_parser_and_a_folding_megatron_accepts_but_the_mesh_refuses(
        megatron_arguments, monkeypatch):
    """The check is FoldingSpec's own: 3 query groups over TP2 pass Megatron's validate_args
    and are refused here with FoldingSpec's message."""
    from folding.recipe import load_recipe

    recipe = load_recipe("tiny-moe")
    args = _parse_with_megatron(megatron_arguments, monkeypatch, recipe, ["--num-query-groups", "3"])
    assert (args.tensor_model_parallel_size, args.num_query_groups) == (2, 3)
    with pytest.raises(InvalidFolding, match=r"TP=2 does not divide num_query_groups=3"):
        megatron_plugin.spec_from_args(args)


# ----------------------------------------------------------------------------- folded_decoder_spec
def _mlp_class_and_params(layer_spec):
    """The class a layer spec's MLP builds and its keyword arguments (ModuleSpec in
    megatron-core 0.16, functools.partial in 0.19)."""
    mlp = layer_spec.submodules.mlp
    if isinstance(mlp, functools.partial):
        return mlp.func, mlp.keywords
    return mlp.module, mlp.params


def _block_spec(moe_layer_freq):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from folding.megatron.model import transformer_config
    from folding.recipe import load_recipe

    recipe = load_recipe("tiny-moe")
    arch = dataclasses.replace(recipe.model, moe_layer_freq=moe_layer_freq)
    config = transformer_config(arch, recipe.training, recipe.folding)
    return get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                      normalization="RMSNorm", pp_rank=0)


@pytest.mark.megatron
def test_folded_decoder_spec_folds_the_moe_layers_of_a_block_and_leaves_dense_ones():
    from folding.dispatcher.moe_layer import FoldedMoELayer

    block = _block_spec([1, 0, 1, 1])
    folded = megatron_plugin.folded_decoder_spec(block, megatron_namespace(moe_layer_freq=[1, 0, 1, 1]))
    assert type(folded) is type(block) and len(folded.layer_specs) == 4
    assert folded.layer_norm == block.layer_norm
    assert folded.layer_specs[1] is block.layer_specs[1]  # the dense layer, untouched
    for i in (0, 2, 3):
        cls, params = _mlp_class_and_params(folded.layer_specs[i])
        assert cls is FoldedMoELayer
        assert params["moe_ordinal"] == {1: 0, 3: 1, 4: 2} and params["gpus_per_node"] == 8
        placement = params["placement"]
        assert (placement.num_layers, placement.ep_size, placement.slots_per_rank) == (3, 4, 2)
        assert np.array_equal(placement.layers, np.tile(np.arange(8), (3, 1)))  # identity
    # Megatron's own spec is not changed in place.
    assert _mlp_class_and_params(block.layer_specs[0])[0] is not FoldedMoELayer
    # Folding a folded spec changes nothing (a patched script run by `folding megatron`).
    again = megatron_plugin.folded_decoder_spec(folded, megatron_namespace(moe_layer_freq=[1, 0, 1, 1]))
    assert all(a is b for a, b in zip(again.layer_specs, folded.layer_specs))


@pytest.mark.megatron
def test_folded_decoder_spec_of_a_layer_spec_with_a_placement_file(tmp_path):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from folding.dispatcher.moe_layer import FoldedMoELayer

    rows = [np.random.default_rng(layer).permutation(8) for layer in range(4)]
    Placement(8, 4, 4, 2, 4, np.stack(rows)).save(tmp_path / "p.json")
    layer = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False)
    args = megatron_namespace(folding_placement=str(tmp_path / "p.json"), folding_gpus_per_node=4)
    cls, params = _mlp_class_and_params(megatron_plugin.folded_decoder_spec(layer, args))
    assert cls is FoldedMoELayer and params["gpus_per_node"] == 4
    assert np.array_equal(params["placement"].layers, np.stack(rows))
    assert params["moe_ordinal"] == {1: 0, 2: 1, 3: 2, 4: 3}
    # One layer spec makes every layer a MoE layer: a pattern with dense layers is refused.
    with pytest.raises(FoldingError, match="single layer spec makes every layer a MoE layer"):
        megatron_plugin.folded_decoder_spec(layer, megatron_namespace(moe_layer_freq=[1, 0, 1, 1]))


def _replicated_placement(path):
    layers = np.tile(np.array([0, 1, 0, 2, 3, 4, 5, 1, 6, 7, 6, 3]), (4, 1))  # 3 slots per rank
    Placement(8, 4, 4, 3, 4, layers).validate().save(path)
    return dict(folding_placement=str(path))


def _short_placement(path):
    Placement.identity(8, 2, 4, 4).save(path)
    return dict(folding_placement=str(path))


@pytest.mark.megatron
@pytest.mark.parametrize("changes, message", [
    (dict(moe_grouped_gemm=True), "does not work with --moe-grouped-gemm: the folded MoE layer "
                                  "needs SequentialMLP experts"),
    (dict(moe_shared_expert_overlap=True), "does not work with --moe-shared-expert-overlap"),
    (dict(overlap_moe_expert_parallel_comm=True), "--overlap-moe-expert-parallel-comm"),
    (dict(moe_token_dispatcher_type="flex"), "--moe-token-dispatcher-type flex"),
    (dict(moe_permute_fusion=True), "--moe-permute-fusion fuses Megatron's permutation"),
    (dict(cuda_graph_impl="local", cuda_graph_scope=["moe_router"]), "--cuda-graph-scope moe_router"),
    (dict(moe_router_padding_for_quantization=True), "--moe-router-padding-for-quantization"),
    (dict(num_experts=None), "needs a MoE model \\(--num-experts\\)"),
    (_replicated_placement, "1 spare slot\\(s\\) per rank for replicas"),
    (_short_placement, "has 2 MoE layers but 4 are expected"),
    (dict(folding_placement="/nonexistent/p.json"), "cannot read placement /nonexistent/p.json"),
    (dict(expert_model_parallel_size=3), "EP=3 does not divide num_experts=8"),
])
def test_folded_decoder_spec_refuses_what_the_folded_dispatcher_cannot_do(changes, message, tmp_path):
    if callable(changes):
        changes = changes(tmp_path / "p.json")
    block = _block_spec(1)
    with pytest.raises(FoldingError, match=message) as refused:
        megatron_plugin.folded_decoder_spec(block, megatron_namespace(**changes))
    assert "\n" not in str(refused.value)


@pytest.mark.megatron
def test_a_spec_with_grouped_gemm_experts_is_refused_even_when_the_flag_is_off():
    """The experts the spec builds are checked too (a --spec file may hold grouped experts)."""
    from megatron.core.transformer.moe.experts import TEGroupedMLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    layer = _block_spec(1).layer_specs[0]
    mlp = layer.submodules.mlp
    if isinstance(mlp, functools.partial):  # megatron-core 0.19
        moe = dataclasses.replace(mlp.keywords["submodules"], experts=TEGroupedMLP)
        mlp = functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": moe})
    else:
        mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(
            mlp.submodules, experts=ModuleSpec(module=TEGroupedMLP)))
    grouped = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, mlp=mlp))
    with pytest.raises(FoldingError, match="needs SequentialMLP experts, the layer spec has TEGroupedMLP"):
        megatron_plugin.folded_decoder_spec(grouped, megatron_namespace())


# ----------------------------------------------------------------------------- on gloo ranks
def _megatron_lm_initialize(args) -> None:
    """What Megatron-LM's initialize_megatron does with these arguments to build its groups."""
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
        args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        order="tp-cp-ep-dp-pp" if not args.use_tp_pp_dp_mapping else "tp-cp-ep-pp-dp")


def _mismatch(spec):
    from folding.megatron.groups import MeshMismatch

    try:
        megatron_plugin.check_mesh(spec)
    except MeshMismatch as e:
        return str(e)
    return None


def _build_stage(args, arch, recipe):
    """(this rank's pipeline stage of a GPT model, what built it), built as the patched
    pretrain_gpt.py builds it: megatron-core 0.19's GPTModelBuilder with the plugin's spec
    provider and pre-wrap hook, or as the patched gpt_builder does on 0.16 (mesh check, decoder
    block spec through folded_decoder_spec, GPTModel)."""
    from megatron.core import parallel_state as ps

    from folding.megatron.model import MoERouting, transformer_config

    config = transformer_config(arch, recipe.training, recipe.folding, MoERouting(dispatcher="folded"))
    config.transformer_impl = "local"
    try:
        from megatron.training.models.base import compose_hooks
        from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig
    except ImportError:  # megatron-core 0.16's wheel: no megatron.training
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
        from megatron.core.models.gpt.gpt_model import GPTModel

        megatron_plugin.check_mesh(megatron_plugin.spec_from_args(args))
        block = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                           normalization="RMSNorm")
        model = GPTModel(config, megatron_plugin.folded_decoder_spec(block, args), vocab_size=256,
                         max_sequence_length=128, position_embedding_type="rope",
                         pre_process=ps.is_pipeline_first_stage(),
                         post_process=ps.is_pipeline_last_stage())
        return model, "GPTModel"
    from megatron.core.process_groups_config import ProcessGroupCollection

    model_config = GPTModelConfig(transformer=config, vocab_size=256, seq_length=128,
                                  position_embedding_type="rope")
    model_config.transformer_layer_spec = megatron_plugin.layer_spec_provider(
        args, model_config.transformer_layer_spec)
    model_config.pre_wrap_hooks.append(megatron_plugin.check_mesh_hook(args))
    model = GPTModelBuilder(model_config).build_model(ProcessGroupCollection.use_mpu_process_groups())
    return compose_hooks(model_config.pre_wrap_hooks)([model])[0], "GPTModelBuilder"


def _plugin_on_megatron_groups(rank, world, placement_path):
    from megatron.core import parallel_state as ps

    from folding.megatron.cpu_runtime import enable
    from folding.megatron.groups import destroy
    from folding.recipe import load_recipe

    enable()
    out = {}
    # 1. TP2 DP2 | ETP1 EP2 EDP2: the right mesh passes, a wrong one fails on every rank.
    args = megatron_namespace(world_size=4, expert_model_parallel_size=2)
    _megatron_lm_initialize(args)
    spec = megatron_plugin.spec_from_args(args)
    out["checked"] = megatron_plugin.check_mesh(spec)
    out["other_order"] = _mismatch(spec.with_degrees(order="tp-cp-dp-ep-pp"))
    # Megatron hands rank 1 another EP group (its DP group [1, 3] instead of [0, 1]).
    real = ps.get_expert_model_parallel_group
    if rank == 1:
        ps.get_expert_model_parallel_group = lambda *a, **k: ps.get_data_parallel_group()
    out["one_group"] = _mismatch(spec)
    ps.get_expert_model_parallel_group = real
    out["again"] = _mismatch(spec)
    destroy()
    # 2. PP2 | EP2, dense layer 2: each stage's MoE layers are folded with their own placement row.
    recipe = load_recipe("tiny-moe", world_size=4, tp=1, pp=2, ep=2, etp=1)
    arch = dataclasses.replace(recipe.model, moe_layer_freq=[1, 0, 1, 1])
    args = megatron_namespace(world_size=4, tensor_model_parallel_size=1,
                              pipeline_model_parallel_size=2, expert_model_parallel_size=2,
                              sequence_parallel=False, moe_layer_freq=[1, 0, 1, 1],
                              folding_placement=placement_path, folding_gpus_per_node=4)
    _megatron_lm_initialize(args)
    model, out["built_by"] = _build_stage(args, arch, recipe)
    out["layers"] = [(layer.layer_number, type(layer.mlp).__name__,
                      getattr(layer.mlp, "local_slot_experts", None)) for layer in model.decoder.layers]
    out["stage"] = ps.get_pipeline_model_parallel_rank()
    out["ep_rank"] = ps.get_expert_model_parallel_rank()
    destroy()
    return out


@pytest.mark.megatron
@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_plugin_on_groups_megatron_built(tmp_path):
    from folding.run.launch import run_ranks

    rows = np.array([[3, 2, 1, 0, 7, 6, 5, 4], [0, 4, 1, 5, 2, 6, 3, 7], [7, 0, 6, 1, 5, 2, 4, 3]])
    Placement(8, 3, 2, 4, 4, rows).save(tmp_path / "p.json")
    per_rank = run_ranks(_plugin_on_megatron_groups, 4, str(tmp_path / "p.json"), timeout_s=600)
    try:
        import megatron.training.models.gpt  # noqa: F401 - megatron-core 0.19 builds through it
        built_by = "GPTModelBuilder"
    except ImportError:
        built_by = "GPTModel"
    assert {out["built_by"] for out in per_rank} == {built_by}

    for rank, out in enumerate(per_rank):
        # The right mesh: all 10 kinds of group agree on every rank.
        assert out["checked"] == 10
        # Another rank order: every rank raises, naming a group of its own.
        assert re.match(rf"rank {rank}: Megatron's moe e(p|dp) group is \[", out["other_order"]), out
        # One group differs on rank 1 only: rank 1 names it, every other rank names it too.
        message = out["one_group"]
        if rank == 1:
            assert message.startswith("rank 1: Megatron's moe ep group is [1, 3], the folded "
                                      "mesh says [0, 1]"), message
        else:
            assert message.startswith(f"rank {rank}: Megatron's groups differ from the folded mesh "
                                      f"on 1 group(s) of other ranks, first: rank 1: Megatron's "
                                      f"moe ep group is [1, 3]"), message
        assert out["again"] is None
        # Each stage: global layer numbers, the dense layer left alone, this EP rank's slots.
        first = 2 * out["stage"]
        ordinal = {1: 0, 3: 1, 4: 2}
        expected = []
        for number in (first + 1, first + 2):
            if number in ordinal:
                slots = rows[ordinal[number]][4 * out["ep_rank"]:4 * out["ep_rank"] + 4].tolist()
                expected.append((number, "FoldedMoELayer", slots))
            else:
                expected.append((number, "MLP", None))
        assert out["layers"] == expected, (rank, out)
    assert sorted((o["stage"], o["ep_rank"]) for o in per_rank) == [(0, 0), (0, 1), (1, 0), (1, 1)]


# ----------------------------------------------------------------------------- the patches
def parse_unified_diff(text: str):
    """[(old path, new path, [added lines])] of a unified diff; AssertionError when malformed
    (a header missing, a hunk whose line counts do not match its @@ line)."""
    lines, files, i = text.splitlines(), [], 0
    while i < len(lines):
        assert lines[i].startswith("--- a/"), f"line {i + 1}: expected '--- a/PATH', got {lines[i]!r}"
        assert lines[i + 1].startswith("+++ b/"), f"line {i + 2}: expected '+++ b/PATH'"
        old, new, added, hunks = lines[i][6:], lines[i + 1][6:], [], 0
        i += 2
        while i < len(lines) and lines[i].startswith("@@"):
            m = re.fullmatch(r"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@.*", lines[i])
            assert m, f"line {i + 1}: bad hunk header {lines[i]!r}"
            want_old, want_new = int(m[2] or 1), int(m[4] or 1)
            got_old = got_new = 0
            i += 1
            while got_old < want_old or got_new < want_new:
                assert i < len(lines), "hunk ends early"
                tag, body = lines[i][:1], lines[i][1:]
                assert tag in (" ", "-", "+"), f"line {i + 1}: {lines[i]!r} in a hunk"
                got_old += tag in (" ", "-")
                got_new += tag in (" ", "+")
                if tag == "+":
                    added.append(body)
                i += 1
            assert (got_old, got_new) == (want_old, want_new), f"hunk counts before line {i + 1}"
            hunks += 1
        assert hunks, f"{old}: no hunk"
        files.append((old, new, added))
    return files


def test_there_is_a_patch_per_supported_release_and_the_readme_names_each():
    names = {p.name for p in PATCHES}
    assert {"megatron-lm-core_v0.16.1.patch", "megatron-lm-core_v0.19.0.patch"} <= names
    readme = (ROOT / "patches" / "README.md").read_text()
    assert all(name in readme for name in names)


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_is_well_formed_and_calls_only_what_the_plugin_has(patch):
    files = parse_unified_diff(patch.read_text())
    assert {old for old, _, _ in files} <= {"pretrain_gpt.py", "gpt_builders.py"}
    assert all(old == new for old, new, _ in files)
    added = [line for _, _, lines in files for line in lines]
    assert len(added) <= 12, "the patch should stay a few lines"
    used = set(re.findall(r"megatron_plugin\.(\w+)", "\n".join(added)))
    assert {"add_arguments"} <= used
    assert {"check_mesh", "check_mesh_hook"} & used and \
        {"folded_decoder_spec", "layer_spec_provider"} & used
    assert [n for n in sorted(used) if not hasattr(megatron_plugin, n)] == []
    # Every --folding-* argument the patch reads is one add_arguments defines.
    flags = vars(megatron_plugin.add_arguments(argparse.ArgumentParser()).parse_args([]))
    read = set(re.findall(r"\b(folding_\w+)", "\n".join(added)))
    assert read and read <= set(flags), read - set(flags)
    assert "from folding import megatron_plugin" in added


def test_the_patch_parser_catches_a_broken_patch():
    text = PATCHES[0].read_text()
    broken = text.replace("\n+from folding import megatron_plugin\n", "\n", 1)
    with pytest.raises(AssertionError):
        parse_unified_diff(broken)


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_applies_to_its_megatron_lm_release(patch, tmp_path):
    """With MEGATRON_LM_GIT set to a Megatron-LM git directory holding the release tags: the
    patch applies cleanly to its tag and the patched files are valid Python."""
    git_dir = os.environ.get("MEGATRON_LM_GIT")
    if not git_dir:
        pytest.skip("set MEGATRON_LM_GIT to a Megatron-LM git directory to apply the patches")
    tag = re.fullmatch(r"megatron-lm-(.+)\.patch", patch.name)[1]
    files = [old for old, _, _ in parse_unified_diff(patch.read_text())]
    archive = subprocess.run(["git", "--git-dir", git_dir, "archive", tag, *files],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    for args in (["--check"], []):
        subprocess.run(["git", "apply", *args, str(patch)], cwd=tmp_path, check=True)
    for name in files:
        ast.parse((tmp_path / name).read_text(), filename=name)
