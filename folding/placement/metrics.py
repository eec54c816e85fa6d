"""How good a placement is on a routing trace: balance, dispatch fan-out, and layer-to-layer hops.

For P EP ranks and G ranks per node (rank r on node r // G):

- balance B = (sum over layers of the mean rank load) / (sum over layers of the max rank load),
  where a rank's load is its number of (token, expert) pairs and a replicated expert's pairs split
  evenly over its replicas;
- D_gpu, D_node: mean over tokens and layers of the number of distinct ranks (nodes) that receive
  the token's top-k pairs, which is what a deduplicating dispatcher sends;
- X_gpu, X_node: share of consecutive-layer transitions of a token's top-1 expert that change
  rank (node), ExFlow's inference cost.

With replicas a token reaches one replica chosen uniformly at random, so D and X are expectations
over that choice (exact counts without replicas). The objectives weigh these measures:
"training" costs D_gpu + 4 D_node (a node crossing outweighs the ranks inside it), "inference"
costs X_gpu + X_node (a hop inside a node costs 1, across nodes 2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from folding.errors import FoldingError
from folding.placement.packing import item_loads
from folding.placement.placement import Placement
from folding.placement.trace import RoutingTrace

OBJECTIVES: Dict[str, Tuple[float, float]] = {"training": (1.0, 4.0), "inference": (1.0, 1.0)}
"""Per objective, the weights (rank, node) of its two measures."""


@dataclass
class PlacementMetrics:
    """The measures of one placement on one trace (``nan`` where undefined)."""

    balance: float
    d_gpu: float
    d_node: float
    x_gpu: float
    x_node: float
    solve_seconds: Optional[float] = None
    moved: Optional[float] = None
    """Share of slots that changed from a previous placement, when one was given."""

    def cost(self, objective: str) -> float:
        """The objective's weighted cost (lower is better)."""
        rank_weight, node_weight = objective_weights(objective)
        if objective == "training":
            return rank_weight * self.d_gpu + node_weight * self.d_node
        return rank_weight * self.x_gpu + node_weight * self.x_node

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def objective_weights(objective: str) -> Tuple[float, float]:
    if objective not in OBJECTIVES:
        raise FoldingError(f"unknown objective {objective!r}: use {' or '.join(OBJECTIVES)}")
    return OBJECTIVES[objective]


def check_compatible(placement: Placement, trace: RoutingTrace) -> None:
    """Refuse a placement made for another model than the trace's."""
    placement.validate(num_experts=trace.num_experts, num_layers=trace.num_layers)


def rank_loads(placement: Placement, counts: np.ndarray) -> np.ndarray:
    """float64 [L, P]: (token, expert) pairs each rank receives, given per-layer expert counts."""
    loads = np.stack([item_loads(row, counts[layer]) for layer, row in enumerate(placement.layers)])
    return loads.reshape(placement.num_layers, placement.ep_size, placement.slots_per_rank).sum(axis=2)


def balance(loads: np.ndarray) -> float:
    """B = sum over layers of mean rank load / sum over layers of max rank load."""
    peak = loads.max(axis=1).sum()
    return float(loads.mean(axis=1).sum() / peak) if peak > 0 else 1.0


def expected_distinct(topk: np.ndarray, fractions: np.ndarray, chunk: int = 1 << 16) -> float:
    """Sum over tokens of the expected number of distinct hosts their top-k pairs reach.

    ``topk`` int [T, k] is one layer, ``fractions`` [E, H] the share of each expert on each host.
    A host is reached unless every pair routed to one of its replicas goes elsewhere, so the
    expectation per token is the sum over hosts of 1 - prod over its pairs of (1 - share).
    """
    E, H = fractions.shape
    width = max(int((fractions > 0).sum(axis=1).max()), 1)
    order = np.argsort(-fractions, axis=1, kind="stable")[:, :width]
    share = np.take_along_axis(fractions, order, axis=1)
    hosts = np.where(share > 0, order, H)  # H marks padding, which contributes nothing
    log_miss = np.log(np.maximum(1.0 - share, 1e-30))
    total = 0.0
    for start in range(0, topk.shape[0], chunk):
        ids = topk[start:start + chunk]
        host = hosts[ids].reshape(ids.shape[0], -1)
        miss = log_miss[ids].reshape(ids.shape[0], -1)
        order_in_token = np.argsort(host, axis=1, kind="stable")
        host = np.take_along_axis(host, order_in_token, axis=1)
        miss = np.take_along_axis(miss, order_in_token, axis=1)
        run_start = np.ones(host.shape, dtype=bool)
        run_start[:, 1:] = host[:, 1:] != host[:, :-1]
        starts = np.flatnonzero(run_start.ravel())
        run_miss = np.add.reduceat(miss.ravel(), starts)
        real = host.ravel()[starts] < H
        total += float(np.sum(1.0 - np.exp(run_miss[real])))
    return total


def expected_changes(transitions: np.ndarray, before: np.ndarray, after: np.ndarray) -> float:
    """Expected number of transitions that change host: ``transitions`` [E, E] counts tokens
    going from expert i to expert j, ``before`` / ``after`` [E, H] are the host shares of the two
    layers."""
    stay = before @ after.T
    return float(np.sum(transitions * (1.0 - stay)))


def evaluate(placement: Placement, trace: RoutingTrace, solve_seconds: Optional[float] = None,
             previous: Optional[Placement] = None) -> PlacementMetrics:
    """All measures of ``placement`` on ``trace``."""
    check_compatible(placement, trace)
    L, T = trace.num_layers, trace.num_tokens
    loads = rank_loads(placement, trace.expert_counts())
    shares = {level: [placement.host_fractions(l, level) for l in range(L)] for level in ("rank", "node")}
    distinct = {level: sum(expected_distinct(trace.topk[l], shares[level][l]) for l in range(L)) / (L * T)
                for level in shares}
    hops = {level: float("nan") for level in shares}
    if L > 1:
        transitions = trace.top1_transitions()
        for level in shares:
            changes = sum(expected_changes(transitions[l], shares[level][l], shares[level][l + 1])
                          for l in range(L - 1))
            hops[level] = changes / ((L - 1) * T)
    moved = placement.moved_fraction(previous) if previous is not None else None
    return PlacementMetrics(balance(loads), distinct["rank"], distinct["node"], hops["rank"],
                            hops["node"], solve_seconds, moved)
