"""Create the folded process groups through Megatron-Core and check them against ``folding.mesh``.

``initialize(spec)`` runs on every rank of an already initialised default process group (NCCL or
gloo). It calls megatron-core's ``parallel_state.initialize_model_parallel`` and then
``verify_megatron_groups(spec)``, which compares, on every rank, each group Megatron holds with
the group ``FoldingSpec`` computed in pure Python. All ranks agree on the verdict before anyone
raises, so a mismatch stops every rank instead of leaving some waiting in a collective.
``verify_megatron_groups`` alone checks groups someone else built (Megatron-LM's
``initialize_megatron``; see ``folding.megatron.plugin``).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from folding.errors import FoldingError
from folding.megatron.mapping import parallel_state_kwargs
from folding.mesh import FoldingSpec


class MeshMismatch(RuntimeError):
    """Megatron built a group that differs from the pure-Python mesh."""


def _megatron_group_getters() -> Dict[Tuple[str, str], Callable]:
    from megatron.core import parallel_state as ps

    return {
        ("attention", "tp"): ps.get_tensor_model_parallel_group,
        ("attention", "cp"): ps.get_context_parallel_group,
        ("attention", "dp"): lambda: ps.get_data_parallel_group(with_context_parallel=False),
        ("attention", "pp"): ps.get_pipeline_model_parallel_group,
        ("attention", "tp_cp"): ps.get_tensor_and_context_parallel_group,
        ("attention", "dp_cp"): lambda: ps.get_data_parallel_group(with_context_parallel=True),
        ("moe", "etp"): ps.get_expert_tensor_parallel_group,
        ("moe", "ep"): ps.get_expert_model_parallel_group,
        ("moe", "edp"): ps.get_expert_data_parallel_group,
        ("moe", "etp_ep"): ps.get_expert_tensor_and_model_parallel_group,
    }


def megatron_groups_of_this_rank() -> Dict[Tuple[str, str], List[int]]:
    """The ranks of every group Megatron's parallel_state holds for the calling rank."""
    out = {}
    for key, getter in _megatron_group_getters().items():
        group = getter()
        out[key] = torch.distributed.get_process_group_ranks(group)
    return out


def compare_with_megatron(spec: FoldingSpec, rank: int,
                          megatron_groups: Dict[Tuple[str, str], List[int]]) -> List[str]:
    """One message per group of ``rank`` where Megatron and the pure-Python mesh differ."""
    problems = []
    for (mesh, kind), ranks in megatron_groups.items():
        expected = spec.group_of(rank, mesh, kind)
        if list(ranks) != expected:
            problems.append(f"rank {rank}: Megatron's {mesh} {kind} group is {list(ranks)}, "
                            f"the folded mesh says {expected}")
    return problems


def _require_world(spec: FoldingSpec) -> None:
    if not torch.distributed.is_initialized():
        raise FoldingError("the folded mesh is checked on a process group: call "
                           "torch.distributed.init_process_group() first")
    world = torch.distributed.get_world_size()
    if world != spec.world_size:
        raise FoldingError(f"the folding is for world_size={spec.world_size}, but the process "
                           f"group has {world} ranks")


def verify_megatron_groups(spec: FoldingSpec) -> int:
    """Compare every group Megatron's parallel_state holds with ``spec``'s mesh, on every rank.

    A collective: every rank of the default process group must call it. All ranks learn the
    verdict together; on a mismatch each raises ``MeshMismatch`` naming the first differing
    group (its own if it has one, else the first of the lowest rank that has one). Returns the
    number of groups checked on this rank.
    """
    from megatron.core import parallel_state as ps

    _require_world(spec)
    if not ps.model_parallel_is_initialized():
        raise FoldingError("Megatron's parallel state is not initialised: build its groups first "
                           "(initialize_model_parallel or Megatron-LM's initialize_megatron)")
    rank = torch.distributed.get_rank()
    groups = megatron_groups_of_this_rank()
    problems = compare_with_megatron(spec, rank, groups)
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    failed = torch.tensor([len(problems)], device=device)
    torch.distributed.all_reduce(failed)
    if not failed.item():
        return len(groups)
    # Only on a mismatch: every rank learns what differs, so each error names a group.
    everyone: List[List[str]] = [[] for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(everyone, problems[:1])
    if problems:
        raise MeshMismatch("; ".join(problems))
    first = next(p[0] for p in everyone if p)
    raise MeshMismatch(f"rank {rank}: Megatron's groups differ from the folded mesh on "
                       f"{int(failed.item())} group(s) of other ranks, first: {first}")


def initialize(spec: FoldingSpec, **megatron_kwargs) -> None:
    """Build Megatron's model-parallel groups for ``spec`` and verify them, on every rank.

    Extra keyword arguments go to ``initialize_model_parallel`` unchanged.
    """
    from megatron.core import parallel_state as ps

    _require_world(spec)
    ps.initialize_model_parallel(**parallel_state_kwargs(spec), **megatron_kwargs)
    verify_megatron_groups(spec)


def destroy() -> None:
    """Undo ``initialize``: Megatron's state and the process groups it created.

    Megatron's destroy_model_parallel forgets its groups but leaves them alive, each with its
    own communication threads; a process that initialises many foldings in turn must destroy
    them too. A group's threads end only when nothing refers to it any more, so the references
    Megatron keeps in module globals go as well: the MoE auxiliary-loss tracker (each entry
    holds its reduction groups and a loss tensor whose autograd graph holds the whole model)
    and the intra-partial data-parallel groups destroy_model_parallel leaves set. Without this
    every folding left about 45 threads per rank behind, and each later one ran slower.
    """
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    try:  # megatron-core 0.19: a tracker object
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

        destroy_moe_metrics_tracker()
    except ImportError:  # 0.16: a module-level dict
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
    for name in ("_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP",
                 "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP_GLOO"):
        if hasattr(ps, name):
            setattr(ps, name, None)
    dist = torch.distributed
    world = dist.group.WORLD
    for group in list(dist.distributed_c10d._world.pg_map):
        if group is not world and group is not None:
            dist.destroy_process_group(group)


def _initialize_and_report(rank: int, world_size: int, specs: List[FoldingSpec]) -> List[int]:
    """Rank body of ``check_on_gloo``: initialise and verify each folding in turn."""
    checked = []
    for spec in specs:
        initialize(spec)
        checked.append(len(megatron_groups_of_this_rank()))
        destroy()
    return checked


def check_on_gloo(specs: List[FoldingSpec], timeout_s: float = 600) -> int:
    """Spawn local gloo ranks and run ``initialize`` for each folding (all of one world size).

    Returns the number of (rank, group) pairs checked; raises RankFailed naming the first rank
    whose Megatron groups differ from the folded mesh.
    """
    from folding.run.launch import run_ranks

    worlds = {s.world_size for s in specs}
    if len(worlds) != 1:
        raise FoldingError(f"check_on_gloo takes foldings of one world size, got {sorted(worlds)}")
    results = run_ranks(_initialize_and_report, worlds.pop(), specs, timeout_s=timeout_s)
    return sum(sum(r) for r in results)
