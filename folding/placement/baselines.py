"""Reference placements, written from their published descriptions.

- contiguous: Megatron's default, expert e on rank e // (E/P), no replicas.
- EPLB-style (DeepSeek's expert-parallel load balancer): each spare slot replicates the expert
  with the largest load per replica, then greedy longest-first packing with equal counts per
  GPU. Hierarchical when the ranks fill whole nodes: experts are packed onto nodes first, each
  node replicates inside its own spare slots and packs onto its GPUs. No traffic term.
- ExFlow-style: an equal number of experts per rank, no replicas and no load constraint,
  minimising X_gpu (cross-GPU moves of a token's top-1 expert between consecutive layers). ExFlow
  solves an integer program; here each layer is an assignment problem given its neighbours,
  solved repeatedly (the inference solver's method with node weight 0 and no balance constraint).
"""

from __future__ import annotations

import time
from typing import List

import numpy as np

from folding.placement.inference import inference_search
from folding.placement.packing import balanced_packing, layer_items, replica_counts
from folding.placement.placement import Placement
from folding.placement.problem import LayerItems, SolveResult, check_sizes
from folding.placement.trace import RoutingTrace

BASELINES = ("contiguous", "eplb", "exflow")


def contiguous(trace: RoutingTrace, ep_size: int, gpus_per_node: int) -> SolveResult:
    start = time.perf_counter()
    check_sizes(trace.num_experts, ep_size, gpus_per_node, 0)
    placement = Placement.identity(trace.num_experts, trace.num_layers, ep_size, gpus_per_node)
    return SolveResult(placement, time.perf_counter() - start)


def eplb_layer(counts: np.ndarray, ep_size: int, gpus_per_node: int, redundant: int):
    """(expert, rank) of every item of one layer, EPLB-style."""
    E = len(counts)
    num_nodes = ep_size // gpus_per_node
    hierarchical = num_nodes > 1 and ep_size % gpus_per_node == 0 and E % num_nodes == 0
    slots_per_rank = E // ep_size + redundant
    if not hierarchical:
        experts, loads = layer_items(counts, replica_counts(counts, ep_size * redundant))
        return experts, balanced_packing(loads, ep_size, slots_per_rank)
    node_of_expert = balanced_packing(counts.astype(np.float64), num_nodes, E // num_nodes)
    all_experts: List[np.ndarray] = []
    all_ranks: List[np.ndarray] = []
    for node in range(num_nodes):
        members = np.flatnonzero(node_of_expert == node)
        replicas = replica_counts(counts[members], gpus_per_node * redundant)
        local, loads = layer_items(counts[members], replicas)
        all_experts.append(members[local])
        all_ranks.append(node * gpus_per_node + balanced_packing(loads, gpus_per_node, slots_per_rank))
    return np.concatenate(all_experts), np.concatenate(all_ranks)


def eplb(trace: RoutingTrace, ep_size: int, gpus_per_node: int, redundant: int = 0) -> SolveResult:
    start = time.perf_counter()
    check_sizes(trace.num_experts, ep_size, gpus_per_node, redundant)
    counts = trace.expert_counts()
    items = [eplb_layer(counts[l], ep_size, gpus_per_node, redundant) for l in range(trace.num_layers)]
    placement = Placement.from_rank_assignment(trace.num_experts, ep_size, gpus_per_node,
                                               [e for e, _ in items], [r for _, r in items])
    return SolveResult(placement, time.perf_counter() - start)


def exflow(trace: RoutingTrace, ep_size: int, gpus_per_node: int, time_limit=None,
           progress: bool = False) -> SolveResult:
    start = time.perf_counter()
    check_sizes(trace.num_experts, ep_size, gpus_per_node, 0)
    E, P = trace.num_experts, ep_size
    layers = [LayerItems(np.arange(E), np.ones(E), np.arange(E) // (E // P))
              for _ in range(trace.num_layers)]
    rank_nodes = np.arange(P) // gpus_per_node
    deadline = None if time_limit is None else start + time_limit
    info = inference_search(trace, layers, rank_nodes, E // P, 1.0, 0.0, deadline, None, progress)
    placement = Placement.from_rank_assignment(E, P, gpus_per_node, [i.experts for i in layers],
                                               [i.ranks for i in layers])
    return SolveResult(placement, time.perf_counter() - start, info)


def run_baseline(name: str, trace: RoutingTrace, ep_size: int, gpus_per_node: int, redundant: int = 0,
                 time_limit=None, progress: bool = False) -> SolveResult:
    if name == "contiguous":
        return contiguous(trace, ep_size, gpus_per_node)
    if name == "eplb":
        return eplb(trace, ep_size, gpus_per_node, redundant)
    if name == "exflow":
        return exflow(trace, ep_size, gpus_per_node, time_limit, progress)
    raise ValueError(f"unknown baseline {name!r}")
