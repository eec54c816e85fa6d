"""The placement problem every method solves: the bottom of the solver. The searches
(``training``, ``inference``, ``starts``, ``solver``), the exact MILP (``milp``), the chain bound
(``chain_bound``) and the node program (``node_program``) import from it, never the other way;
it builds only on the primitives below it (``packing``, ``search``'s balance bound, the
placement and trace files).

It owns what a placement must satisfy and what it costs, independent of how it is searched:

- the items of each layer (``LayerItems``, ``build_items``): an expert's replicas, each carrying
  an even share of its pairs (``item_affinity``), starting on greedy balanced packing or on a
  previous placement;
- the balance limits of a layer (``balance_limits``, ``expert_balance_limits``): the bound on
  the expected peak load on unseen tokens may exceed balanced packing's by ``balance_slack``
  (``search`` explains the bound), so that co-locating experts that tokens pick together does
  not buy locality with balance;
- the inference hop costs between ranks (``hop_matrix``), the sizes an instance may have
  (``check_sizes``), every equal split of a layer's items over ranks (``ordered_partitions``,
  which the exact methods enumerate), and what a solve returns (``SolveResult``).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from folding.errors import FoldingError
from folding.placement.packing import balanced_packing, item_loads, layer_items, replica_counts
from folding.placement.placement import Placement
from folding.placement.search import LayerSearch, balance_bound
from folding.placement.trace import RoutingTrace

DEFAULT_BALANCE_SLACK = 0.0125
"""How far the bound on the expected peak load may rise over balanced packing's. Measured by
``tools/bench_place.py``: 0.75% left D_gpu at 0.82x contiguous with one replica per rank at 64
ranks; 1.25% reaches 0.77x while every case keeps B within 0.009 of EPLB-style (1.5% loses 0.010)."""


@dataclass
class LayerItems:
    """The items of one layer and their current ranks."""

    experts: np.ndarray
    loads: np.ndarray
    ranks: np.ndarray
    home: Optional[np.ndarray] = None
    coactivation: Optional[np.ndarray] = None
    """[E, E] expert co-activation of the layer (None: ignored, as the ExFlow baseline does)."""
    threshold: float = np.inf
    """Threshold of the balance bound (inf: no balance constraint)."""
    excess_budget: float = np.inf
    """Largest expected excess over ``threshold`` allowed (see ``search``)."""
    noise: bool = True
    """Whether balance accounts for the sampling noise of unseen tokens (``search``)."""

    def affinity(self) -> Optional[np.ndarray]:
        """[V, V] item co-activation, or None."""
        return None if self.coactivation is None else item_affinity(self.coactivation, self.experts)

    def search(self, start: np.ndarray, rank_nodes: np.ndarray, rank_weight: float, node_weight: float,
               linear: Optional[np.ndarray] = None, home: Optional[np.ndarray] = None,
               max_moved: Optional[int] = None, affinity: Optional[np.ndarray] = None) -> LayerSearch:
        """A local search of this layer from ranks ``start`` within its balance limits;
        ``affinity`` saves recomputing ``affinity()`` for callers that search repeatedly."""
        return LayerSearch(start, self.loads, rank_nodes, self.threshold, self.excess_budget,
                           self.affinity() if affinity is None else affinity, rank_weight, node_weight,
                           linear=linear, home=home, max_moved=max_moved, noise=self.noise)


@dataclass
class SolveResult:
    placement: Placement
    seconds: float
    info: dict = field(default_factory=dict)


def check_sizes(num_experts: int, ep_size: int, gpus_per_node: int, redundant: int) -> None:
    if ep_size < 1 or num_experts % ep_size:
        raise FoldingError(f"ep_size={ep_size} does not divide num_experts={num_experts}")
    if gpus_per_node < 1:
        raise FoldingError(f"gpus_per_node={gpus_per_node} must be positive")
    if redundant < 0:
        raise FoldingError(f"redundant slots per rank ({redundant}) cannot be negative")


def balance_limits(loads: np.ndarray, affinity: Optional[np.ndarray], ep_size: int, slots_per_rank: int,
                   slack: float, noise: bool = True) -> Tuple[float, float]:
    """(threshold, excess budget) of a layer: the bound on the expected peak load of greedy
    balanced packing, raised by ``slack``, expressed at packing's best threshold."""
    bins = balanced_packing(loads, ep_size, slots_per_rank)
    threshold, bound = balance_bound(bins, loads, ep_size, affinity, noise)
    return threshold, bound * (1.0 + slack) - threshold


def expert_balance_limits(trace: RoutingTrace, layer: int, counts: np.ndarray, ep_size: int, slots: int,
                          slack: float, noise: bool) -> Tuple[float, float]:
    """``balance_limits`` of one layer of ``trace`` with one item per expert (``counts``: the
    layer's expert counts), as the exact methods place it."""
    affinity = item_affinity(trace.coactivation(layer), np.arange(trace.num_experts)) if noise else None
    return balance_limits(counts.astype(np.float64), affinity, ep_size, slots, slack, noise)


def build_items(trace: RoutingTrace, ep_size: int, redundant: int, slack: float,
                previous: Optional[Placement] = None, noise: bool = True) -> List[LayerItems]:
    """Items, loads and caps of every layer, starting on balanced packing (or the previous
    placement, whose replica counts are then kept)."""
    counts = trace.expert_counts()
    slots_per_rank = trace.num_experts // ep_size + redundant
    layers = []
    for layer in range(trace.num_layers):
        if previous is not None:
            experts = previous.layers[layer].copy()
            loads = item_loads(experts, counts[layer])
            ranks = previous.slot_ranks.copy()
        else:
            replicas = replica_counts(counts[layer], ep_size * redundant)
            experts, loads = layer_items(counts[layer], replicas)
            ranks = balanced_packing(loads, ep_size, slots_per_rank)
        items = LayerItems(experts, loads, ranks, ranks.copy() if previous is not None else None,
                           trace.coactivation(layer), noise=noise)
        items.threshold, items.excess_budget = balance_limits(loads, items.affinity(), ep_size,
                                                              slots_per_rank, slack, noise)
        layers.append(items)
    return layers


def item_affinity(coactivation: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """[V, V]: tokens expected to pick both items, each expert's pairs split over its replicas."""
    replicas = np.bincount(experts, minlength=coactivation.shape[0])[experts].astype(np.float64)
    return coactivation[np.ix_(experts, experts)] / np.outer(replicas, replicas)


def hop_matrix(rank_nodes: np.ndarray, rank_weight: float, node_weight: float) -> np.ndarray:
    """[P, P]: the cost of a token moving from rank a to rank b between layers."""
    ranks = np.arange(len(rank_nodes))
    return (rank_weight * (ranks[:, None] != ranks[None, :])
            + node_weight * (rank_nodes[:, None] != rank_nodes[None, :]))


@functools.lru_cache(maxsize=8)
def ordered_partitions(count: int, parts: int, size: int) -> np.ndarray:
    """int64 [N, parts, size]: every split of range(count) into ``parts`` labelled groups of
    ``size``. Kept: every layer of an instance asks for the same."""
    return _partitions_of(list(range(count)), parts, size)


def _partitions_of(items: List[int], parts: int, size: int) -> np.ndarray:
    if parts == 1:
        return np.array([[items]], dtype=np.int64)
    out = []
    for group in itertools.combinations(items, size):
        remaining = [i for i in items if i not in group]
        for rest in _partitions_of(remaining, parts - 1, size):
            out.append(np.vstack(([group], rest)))
    return np.array(out, dtype=np.int64)
