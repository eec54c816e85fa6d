"""Megatron's MoELayer with the folded dispatcher and an expert placement.

``folded_layer_spec`` swaps Megatron's MoELayer for ``FoldedMoELayer`` in a GPT layer spec (a
ModuleSpec in megatron-core 0.16, a functools.partial in 0.19). The layer keeps Megatron's
router, experts and shared experts; it builds one local expert per placement slot, hands the
dispatcher its layer's row of the placement, and marks every replica slot but the first of an
expert so Megatron's gradient norm counts the expert once. ``sum_replica_gradients`` keeps the
replicas of an expert one parameter: after Megatron reduces gradients over expert-data-parallel
ranks, the gradients of all slots of an expert are summed over the EP group.
The experts' sharded state dict names every slot by its logical expert
(``folding.dispatcher.expert_checkpoint``), so torch_dist checkpoints load under any placement.
``is_moe_layer_spec`` and ``experts_class`` read a layer spec of either release.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from folding.dispatcher.expert_checkpoint import install_logical_naming
from folding.dispatcher.token_dispatcher import FoldedTokenDispatcher
from folding.errors import FoldingError

try:
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
except ImportError:  # pragma: no cover - megatron-core is a dependency
    MoELayer = SequentialMLP = torch.nn.Module


def _experts_with_slots(original, slots: int):
    """An experts builder that makes ``slots`` local experts whatever count it is given.

    A class, because megatron-core 0.16's build_module returns plain functions uncalled; its
    ``__new__`` returns the module Megatron's own builder makes.
    """

    class ExpertsWithSlots:
        def __new__(cls, num_local_experts, config, **kwargs):
            if isinstance(original, (ModuleSpec, type)):
                return build_module(original, slots, config, **kwargs)
            return original(slots, config, **kwargs)

    return ExpertsWithSlots


class FoldedMoELayer(MoELayer):
    """Megatron's MoE layer, dispatching with ``FoldedTokenDispatcher`` over a placement."""

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None,
                 pg_collection=None, *, placement, moe_ordinal: Dict[int, int],
                 gpus_per_node: int, node_dedup: Optional[bool] = None, **kwargs):
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        self.placement_rows = placement.layers
        slots = placement.slots_per_rank
        if slots != config.num_moe_experts // dist.get_world_size(pg_collection.ep):
            submodules = dataclasses.replace(
                submodules, experts=_experts_with_slots(submodules.experts, slots))
        super().__init__(config, submodules, layer_number=layer_number,
                         pg_collection=pg_collection, **kwargs)
        self.moe_ordinal = moe_ordinal
        self.slots_per_rank = slots
        self.num_local_experts = slots
        self.token_dispatcher = FoldedTokenDispatcher(config, pg_collection, slots, gpus_per_node,
                                                      node_dedup=node_dedup)
        self.replica_groups: List[List[int]] = []
        if layer_number is not None:
            self._apply_placement()

    def set_layer_number(self, layer_number: int):
        super().set_layer_number(layer_number)
        self._apply_placement()

    def set_placement(self, placement) -> None:
        """Follow another placement (every layer's row); the experts' weights are the caller's
        to move (``RankTrainer.move_experts``)."""
        self.placement_rows = placement.layers
        self._apply_placement()

    def _apply_placement(self) -> None:
        # On the host even where the model is built on the meta device: the placement is data.
        row = torch.as_tensor(self.placement_rows[self.moe_ordinal[self.layer_number]], device="cpu")
        self.token_dispatcher.set_slot_experts(row)
        first = dist.get_rank(self.ep_group) * self.slots_per_rank
        local = row[first:first + self.slots_per_rank].tolist()
        self.local_slot_experts = local
        self.replica_groups = []
        for expert in sorted(set(row.tolist())):
            where = torch.nonzero(row == expert).flatten().tolist()
            if len(where) > 1:
                self.replica_groups.append([expert] + where)
        experts = list(self.experts.local_experts) if hasattr(self.experts, "local_experts") else None
        if experts is None:
            raise NotImplementedError("the folded MoE layer needs SequentialMLP experts")
        for j, module in enumerate(experts):
            slot = first + j
            primary = int(torch.nonzero(row == local[j]).flatten()[0]) == slot
            for param in module.parameters():
                # Megatron's gradient norm skips parameters marked shared: count an expert once.
                param.shared = not primary
        # Checkpoints name every slot by its logical expert, so they load under any placement.
        install_logical_naming(self.experts, row.tolist(), first, self.config.num_moe_experts,
                               f"decoder.layers.{self.layer_number - 1}")


def _built_class(spec) -> Optional[type]:
    """The class a ModuleSpec, a functools.partial or a bare class builds; None otherwise."""
    if isinstance(spec, ModuleSpec):
        spec = spec.module
    elif isinstance(spec, functools.partial):
        spec = spec.func
    return spec if isinstance(spec, type) else None


def is_moe_layer_spec(layer_spec) -> bool:
    """True when a GPT layer spec's MLP is Megatron's MoELayer (or a subclass)."""
    mlp = getattr(getattr(layer_spec, "submodules", None), "mlp", None)
    built = _built_class(mlp)
    return built is not None and issubclass(built, MoELayer)


def is_folded_layer_spec(layer_spec) -> bool:
    """True when a GPT layer spec's MLP is already ``FoldedMoELayer``."""
    built = _built_class(getattr(getattr(layer_spec, "submodules", None), "mlp", None))
    return built is not None and issubclass(built, FoldedMoELayer)


def experts_class(layer_spec) -> Optional[type]:
    """The experts class a MoE layer spec builds (SequentialMLP, GroupedMLP, TEGroupedMLP)."""
    mlp = layer_spec.submodules.mlp
    submodules = mlp.submodules if isinstance(mlp, ModuleSpec) else mlp.keywords.get("submodules")
    return _built_class(getattr(submodules, "experts", None))


def folded_layer_spec(layer_spec, placement, moe_ordinal: Dict[int, int], gpus_per_node: int,
                      node_dedup: Optional[bool] = None):
    """A copy of a Megatron GPT layer spec whose MoE layer is ``FoldedMoELayer``.

    The folded layer builds one module per placement slot, so the spec's experts must be
    SequentialMLP; grouped-GEMM experts are refused with FoldingError.
    """
    mlp = layer_spec.submodules.mlp
    if not is_moe_layer_spec(layer_spec):
        raise TypeError(f"the layer spec's MLP is not a MoE layer: {mlp!r}")
    experts = experts_class(layer_spec)
    if experts is not None and not issubclass(experts, SequentialMLP):
        raise FoldingError(f"the folded MoE layer needs SequentialMLP experts, the layer spec has "
                           f"{experts.__name__} (grouped GEMM); build the spec without grouped GEMM")
    params = dict(placement=placement, moe_ordinal=moe_ordinal, gpus_per_node=gpus_per_node,
                  node_dedup=node_dedup)
    if isinstance(mlp, functools.partial):
        folded = functools.partial(FoldedMoELayer, *mlp.args, **mlp.keywords, **params)
    else:
        folded = dataclasses.replace(mlp, module=FoldedMoELayer, params={**mlp.params, **params})
    submodules = dataclasses.replace(layer_spec.submodules, mlp=folded)
    return dataclasses.replace(layer_spec, submodules=submodules)


def folded_moe_layers(chunks) -> List[FoldedMoELayer]:
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, FoldedMoELayer)]


def sum_replica_gradients(chunks) -> None:
    """Sum the reduced gradients of all slots of every replicated expert over the EP group, so
    the replicas take identical optimizer steps and stay one parameter."""
    for layer in folded_moe_layers(chunks):
        if not layer.replica_groups:
            continue
        first = dist.get_rank(layer.ep_group) * layer.slots_per_rank
        local = {first + j: list(m.parameters()) for j, m in enumerate(layer.experts.local_experts)}
        template = next(iter(local.values()))
        sizes = [p.numel() for p in template]
        buffer = torch.zeros(len(layer.replica_groups), sum(sizes), dtype=torch.float32,
                             device=template[0].device)
        for row, (expert, *slots) in enumerate(layer.replica_groups):
            for slot in slots:
                if slot in local:
                    buffer[row] += torch.cat([p.main_grad.reshape(-1).float() for p in local[slot]])
        dist.all_reduce(buffer, group=layer.ep_group)
        for row, (expert, *slots) in enumerate(layer.replica_groups):
            for slot in slots:
                if slot in local:
                    for p, piece in zip(local[slot], buffer[row].split(sizes)):
                        p.main_grad.copy_(piece.view_as(p.main_grad))
