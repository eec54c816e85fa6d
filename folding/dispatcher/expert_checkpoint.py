"""Checkpoint names of a folded MoE layer's experts: by logical expert id, not by slot.

Megatron's ``SequentialMLP.sharded_state_dict`` names local expert j on EP rank r as global expert
r * n_local + j, which is the logical expert only under Megatron's contiguous layout. Under any
other placement a torch_dist checkpoint would then hold the wrong expert under each name, and
loading it under another placement (or into Megatron's own MoE layer) would silently swap
experts. ``logical_experts_sharded_state_dict`` is the experts' sharded state dict of a
``FoldedMoELayer``: every slot is labelled with the logical expert it holds (global offset =
expert id, global count = ``num_moe_experts``, or the ``experts.{id}.`` prefix in the
``singleton_local_shards`` form), while the state-dict keys stay ``local_experts.{slot}.`` so a
loaded checkpoint goes back into the right module. Every slot of an expert but its first in the
layer's row is a non-main replica, so each expert is written once and loaded into every slot.
Megatron's optimizer formats keyed by parameter (the plain optimizer's, the distributed one's
``fully_reshardable``) build their sharded state from the model's, so Adam's moments follow;
the distributed optimizer's ``dp_reshardable`` stores its buffers slot by slot and does not.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence

from folding.errors import FoldingError


def replica_ordinals(row: Sequence[int]) -> List[int]:
    """For each slot of a placement row, how many earlier slots hold the same expert (0 for
    the expert's first slot, the one that writes it)."""
    seen: dict = {}
    out = []
    for expert in row:
        expert = int(expert)
        out.append(seen.get(expert, 0))
        seen[expert] = out[-1] + 1
    return out


def logical_experts_sharded_state_dict(experts, slot_experts: Sequence[int],
                                       slot_replicas: Sequence[int], num_experts: int,
                                       where: str = "MoE layer", prefix: str = "",
                                       sharded_offsets: tuple = (),
                                       metadata: Optional[dict] = None):
    """The sharded state dict of a SequentialMLP whose local slot j holds logical expert
    ``slot_experts[j]``, the ``slot_replicas[j]``-th copy of it in the layer's row.

    Same structure as Megatron's own (and so the same checkpoint format): only the expert index
    in the sharded keys and offsets, and the replica ids of replica slots, differ. Two slots of
    one expert on the same rank are refused (FoldingError): torch_dist cannot load the same
    shard twice into one rank.
    """
    if len(slot_experts) != len(experts.local_experts):
        raise FoldingError(f"{where}: {len(experts.local_experts)} local experts but "
                           f"{len(slot_experts)} slot labels")
    twice = sorted({int(e) for e in slot_experts if list(slot_experts).count(e) > 1})
    if twice:
        raise FoldingError(f"{where}: expert {twice[0]} has two slots on one EP rank, which a "
                           f"torch_dist checkpoint cannot load; place its replicas on other ranks")
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    singleton_local_shards = metadata.get("singleton_local_shards", False)
    edp_rank = experts.dp_group.rank()
    state = {}
    for slot, module in enumerate(experts.local_experts):
        expert = int(slot_experts[slot])
        state_prefix = f"{prefix}local_experts.{slot}."
        if singleton_local_shards:
            sharded_prefix = f"{prefix}experts.{expert}."
            offsets = sharded_offsets
        else:
            sharded_prefix = f"{prefix}experts."
            offsets = (*sharded_offsets, (len(sharded_offsets), expert, num_experts))
        slot_state = module.sharded_state_dict(state_prefix, offsets, metadata)
        replace_prefix_for_sharding(slot_state, state_prefix, sharded_prefix)
        for key, sharded in slot_state.items():
            replica_id = sharded.replica_id
            if len(replica_id) != 3:
                raise FoldingError(f"{key}: replica_id {replica_id} is not (PP, TP, DP)")
            # A replica slot adds its ordinal to the first coordinate: any nonzero coordinate
            # makes a shard non-main, and Megatron's distributed optimizer keeps the first two
            # coordinates for Adam's state, so replicas are skipped there too. The last one is
            # the expert-data-parallel rank, as in Megatron's SequentialMLP.
            sharded.replica_id = (replica_id[0] + int(slot_replicas[slot]), replica_id[1],
                                  edp_rank)
        state.update(slot_state)
    return state


def install_logical_naming(experts, row: Sequence[int], first_slot: int, num_experts: int,
                           where: str = "MoE layer") -> None:
    """Make ``experts.sharded_state_dict`` name the slots [first_slot, first_slot + n_local) of
    placement row ``row`` by their logical experts; ``where`` names the layer in errors."""
    local = len(experts.local_experts)
    ordinals = replica_ordinals(row)[first_slot:first_slot + local]
    labels = [int(e) for e in row[first_slot:first_slot + local]]
    # An instance attribute: Megatron's parent modules call ``child.sharded_state_dict(...)``,
    # so this replaces the class's method for these experts only.
    experts.sharded_state_dict = functools.partial(
        logical_experts_sharded_state_dict, experts, labels, ordinals, num_experts, where)


def remove_logical_naming(experts) -> None:
    """Back to Megatron's slot-numbered names (for tests that show what the naming prevents)."""
    experts.__dict__.pop("sharded_state_dict", None)
