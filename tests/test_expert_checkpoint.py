"""torch_dist checkpoints of folded MoE layers name experts by logical id: a checkpoint saved under
one placement loads the right expert weights and Adam moments under another placement, into
Megatron's own MoE layer, and under the same placement; with Megatron's slot numbering instead,
the checker sees the wrong experts."""

import numpy as np
import pytest

import megatron_training_shim  # noqa: F401 - spawned ranks never load conftest

pytestmark = [pytest.mark.megatron, pytest.mark.multiprocess]
# Without psutil megatron-core's torch_dist writer processes die and its save waits for ever.
pytest.importorskip("psutil", reason="megatron-core's torch_dist writer needs psutil")

EP, SLOTS, EXPERTS, MOE_LAYERS = 4, 3, 8, 4
# The distributed optimizer's format that keeps one tensor per parameter (the model's sharding,
# resharded on load); Megatron-LM writes it with --ckpt-optim-fully-reshardable.
OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _placement(seed: int):
    """EP4 x 3 slots: a permutation of the 8 experts plus 4 replicas, different in every layer,
    no rank holding an expert twice."""
    from folding.placement.placement import Placement

    rng = np.random.default_rng(seed)
    rows = []
    while len(rows) < MOE_LAYERS:
        row = np.concatenate([rng.permutation(EXPERTS), rng.choice(EXPERTS, 4, replace=False)])
        ranks = row.reshape(EP, SLOTS)
        if all(len(set(r)) == SLOTS for r in ranks.tolist()):
            rows.append(row)
    return Placement(EXPERTS, MOE_LAYERS, EP, SLOTS, 4, np.stack(rows)).validate()


def _every_copy(trainer, local):
    """{full name: [every rank's and every slot's copy]} of per-parameter tensors keyed like
    ``trainer.params``. TP and ETP are 1 here, so each copy is the whole tensor."""
    import torch.distributed as dist

    from folding.layout.weights import local_to_full_name

    named = {}
    for (vp_stage, name), tensor in local.items():
        full = local_to_full_name(name, trainer.arch, trainer.spec, trainer.rank, vp_stage,
                                  trainer.placement)
        named.setdefault(full, []).append(tensor)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, named)
    merged = {}
    for rank in gathered:
        for name, copies in rank.items():
            merged.setdefault(name, []).extend(copies)
    return merged


def _weights(trainer):
    return _every_copy(trainer, trainer.param_shard())


def _expert_moments(trainer):
    """Adam's (exp_avg, exp_avg_sq) of every expert parameter, from the distributed optimizer.
    EDP is 1, so each rank's optimizer holds the whole of its experts' state."""
    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    local = {}
    for key, param in trainer.params.items():
        if ".experts." not in key[1]:
            continue
        owner = next(o for o in optimizers if param in o.model_param_group_index_map)
        state = owner._get_main_param_and_optimizer_states(param)
        assert state["exp_avg"].numel() == param.numel()
        local[key] = tuple(state[k].detach().clone().view_as(param)
                           for k in ("exp_avg", "exp_avg_sq"))
    return _every_copy(trainer, local)


def _same(a, b) -> bool:
    import torch

    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def _differences(expected, got):
    """Full names where any copy differs from the expected tensor (or none is there)."""
    return sorted(name for name, copies in expected.items()
                  if not got.get(name) or not all(_same(c, copies[0]) for c in got[name]))


def _save(directory, state):
    import multiprocessing
    import os
    import queue

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    # Megatron's torch_dist writer forks one writer per file (0.16) and joins it before save
    # returns; multiprocessing refuses children to daemonic processes such as these ranks.
    multiprocessing.current_process()._config["daemon"] = False
    # Its results queue would live in a manager process, which a rank stopped by the launcher
    # would leave behind; a synchronous save hands results over in this process anyway.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    if dist.get_rank() == 0:
        os.makedirs(directory)
    dist.barrier()
    dist_checkpointing.save(state, directory)


def _forget_weights(trainer):
    """Zero every parameter, so a check after a load sees only what the load wrote."""
    import torch

    with torch.no_grad():
        for param in trainer.params.values():
            param.zero_()


def _load_model(trainer, directory, metadata=None):
    from megatron.core import dist_checkpointing

    _forget_weights(trainer)
    model = trainer.chunks[0]
    loaded = dist_checkpointing.load(model.sharded_state_dict(metadata=metadata), directory)
    model.load_state_dict(loaded)


def _keep_adam_step(original):
    """Megatron's distributed optimizer, loading the fully_reshardable format, copies every
    state tensor of a parameter from the checkpoint's, which has no "step": torch's Adam (the
    one on CPU, without Apex or Transformer Engine) keeps one per parameter, and the load sets
    it from the saved param groups first. Leave that step alone and copy the rest."""

    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    return set_states


def _load_model_and_optimizer(trainer, directory):
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not hasattr(DistributedOptimizer._set_main_param_and_optimizer_states, "__wrapped__"):
        wrapped = _keep_adam_step(DistributedOptimizer._set_main_param_and_optimizer_states)
        wrapped.__wrapped__ = DistributedOptimizer._set_main_param_and_optimizer_states
        DistributedOptimizer._set_main_param_and_optimizer_states = wrapped

    # torch's Adam (no Apex or Transformer Engine on CPU) has no step count before its first
    # step, which Megatron's distributed optimizer needs to describe its state; Megatron's own
    # dummy-step initialiser gives it one, and the load overwrites everything it touched.
    for optimizer in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        optimizer._init_optimizer_states_with_dummy_values()
    _forget_weights(trainer)
    model = trainer.chunks[0]
    model_state = model.sharded_state_dict()
    state = {"model": model_state,
             "optimizer": trainer.optimizer.sharded_state_dict(model_state, is_loading=True,
                                                               metadata=OPTIMIZER_FORMAT)}
    loaded = dist_checkpointing.load(state, directory)
    model.load_state_dict(loaded["model"])
    trainer.optimizer.load_state_dict(loaded["optimizer"])


def _save_and_reload(rank, world, root):
    import dataclasses

    from folding.dispatcher.expert_checkpoint import remove_logical_naming
    from folding.dispatcher.moe_layer import folded_moe_layers
    from folding.megatron.cpu_runtime import enable
    from folding.megatron.model import MoERouting
    from folding.recipe import load_recipe
    from folding.run.corpus import ByteCorpus, micro_batches
    from folding.run.rank_trainer import RankTrainer

    enable()
    recipe = load_recipe("tiny-moe", world_size=world, tp=1, ep=EP, etp=1)
    spec = recipe.folding
    training = dataclasses.replace(recipe.training, use_distributed_optimizer=True,
                                   lr_warmup_iters=0)
    folded, megatron = MoERouting(dispatcher="folded"), MoERouting(dispatcher="alltoall")
    p, q = _placement(1), _placement(2)

    def trainer(routing, placement=None):
        return RankTrainer(recipe.model, training, spec, routing, placement=placement)

    # Save under P after one step: trained weights (distinct per expert) and Adam moments.
    saver = trainer(folded, p)
    batch = ByteCorpus(training.data).global_batch(1, 0, 2 * spec.dp, 32)
    saver.step(micro_batches(batch, spec.coordinates(rank)["attention"]["dp"], spec.dp, 2, 1))
    weights, moments = _weights(saver), _expert_moments(saver)
    # Every slot of a replicated expert holds the same tensors: the saved state is one model.
    assert not _differences(weights, weights) and not _differences(moments, moments)
    model_state = saver.chunks[0].sharded_state_dict()
    _save(f"{root}/p", {"model": model_state,
                        "optimizer": saver.optimizer.sharded_state_dict(model_state,
                                                                        metadata=OPTIMIZER_FORMAT)})
    singleton = {"singleton_local_shards": True}
    _save(f"{root}/p-singleton", saver.chunks[0].sharded_state_dict(metadata=singleton))
    for layer in folded_moe_layers(saver.chunks):
        remove_logical_naming(layer.experts)
    _save(f"{root}/p-slots", saver.chunks[0].sharded_state_dict())
    saver.close()

    results = {}
    for case, routing, placement in (("Q", folded, q), ("Megatron", megatron, None),
                                     ("P", folded, p)):
        loader = trainer(routing, placement)
        _load_model_and_optimizer(loader, f"{root}/p")
        results[case] = (_differences(weights, _weights(loader)),
                         _differences(moments, _expert_moments(loader)))
        if case == "Q":
            _load_model(loader, f"{root}/p-singleton", singleton)
            results["Q singleton"] = _differences(weights, _weights(loader))
            for layer in folded_moe_layers(loader.chunks):
                remove_logical_naming(layer.experts)
            _load_model(loader, f"{root}/p-slots")
            results["Q by slot"] = _differences(weights, _weights(loader))
        loader.close()
    results["expert tensors"] = sum(".experts." in n for n in weights)
    results["moment tensors"] = len(moments)
    return results


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    from folding.run.launch import run_ranks

    root = tmp_path_factory.mktemp("expert-checkpoint")
    results = run_ranks(_save_and_reload, EP, str(root))
    assert all(r == results[0] for r in results[1:])
    return results[0]


@pytest.mark.parametrize("case", ["Q", "Megatron", "P"])
def test_experts_load_by_logical_id(reloaded, case):
    """Under another placement (other replicas), into Megatron's own MoE layer,
    and under the same placement: every expert's weights and Adam moments are the saved ones."""
    weight_diffs, moment_diffs = reloaded[case]
    assert weight_diffs == []
    assert moment_diffs == []
    assert reloaded["expert tensors"] == MOE_LAYERS * EXPERTS * 2  # fc1 and fc2 of each
    assert reloaded["moment tensors"] == reloaded["expert tensors"]


def test_singleton_local_shards_form(reloaded):
    assert reloaded["Q singleton"] == []


def test_slot_numbering_would_load_the_wrong_experts(reloaded):
    """Megatron's own naming (slot r*S+j) loads silently under Q, and the checker sees wrong
    experts, and only experts."""
    wrong = reloaded["Q by slot"]
    assert wrong and all(".experts.local_experts." in name for name in wrong)


def test_two_slots_of_an_expert_on_one_rank_are_refused():
    """torch_dist cannot load one shard twice into a rank: refused with one line, before
    Megatron is asked."""
    from types import SimpleNamespace

    from folding.dispatcher.expert_checkpoint import logical_experts_sharded_state_dict
    from folding.errors import FoldingError

    experts = SimpleNamespace(local_experts=[object()] * 3)
    with pytest.raises(FoldingError, match="decoder.layers.1: expert 5 has two slots on one EP"):
        logical_experts_sharded_state_dict(experts, [5, 2, 5], [0, 0, 1], 8, "decoder.layers.1")


def test_replica_ordinals():
    from folding.dispatcher.expert_checkpoint import replica_ordinals

    assert replica_ordinals([3, 1, 3, 0, 1, 3]) == [0, 0, 1, 0, 1, 2]
