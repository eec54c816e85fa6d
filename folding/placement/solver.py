"""The fast expert placement solver, for the "training" and "inference" objectives.

Both objectives keep every layer as balanced as greedy balanced packing of the layer's items:
the bound on the expected peak load on unseen tokens may exceed packing's by ``balance_slack``
(``search`` explains the bound), so that co-locating experts that tokens pick together does not
buy locality with balance. Replica counts follow EPLB's rule (``packing.replica_counts``) unless
a previous placement fixes them. Each item is a replica; its pairs are the expert's, split evenly.

- training: layers are independent (on large instances, placed side by side by one worker
  process per core). Items that tokens pick together (the layer's co-activation
  matrix) are grown into nodes, then into ranks inside each node, heaviest item first; swap
  local search (``search.LayerSearch``) then maximises co-located affinity, weighted 4x across
  nodes (a pairwise stand-in for D_gpu + 4 D_node), by continuation on the price of excess load,
  with whole-rank exchanges between nodes; small layers get iterated local search on top.
- inference: with the neighbouring layers fixed, placing one layer is a linear assignment
  problem (each item's cost on each rank is its hop cost to the neighbours' hosts), solved by
  ``scipy.optimize.linear_sum_assignment`` and then brought within the balance bound by the same
  search. A forward pass follows the layer before; later passes use both neighbours until none
  improves (on large instances they only improve the current placement by swaps); small
  instances get iterated local search over layers, small multi-node ones a second start
  searched with node hops weighted heavily first (nodes settle before the ranks in them),
  instances of at most 4^12 rank assignments a third from the placement that follows each
  layer pair's matching at least cost (``chain_bound``), and those with few enough node
  placements a fourth from a dynamic program over layers at the node level, then the rank
  level (``node_program``); the cheapest is kept.
- with a previous placement both start from it and move at most ``max_moved`` of each layer's
  items (training also tries a fresh solution relabelled to match the previous one).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from folding.errors import FoldingError
from folding.placement.metrics import objective_weights
from folding.placement.packing import balanced_packing, item_loads, layer_items, replica_counts
from folding.placement.placement import Placement, host_fractions
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


def grow_parts(affinity: np.ndarray, loads: np.ndarray, members: np.ndarray, part_sizes: List[int],
               part_cap: float) -> np.ndarray:
    """Split ``members`` into parts of the given sizes: each part starts from the heaviest item
    left and adds the item with the most affinity to it that fits under ``part_cap`` (the
    lightest item if none fits). Returns the part of each member."""
    left = np.ones(len(members), dtype=bool)
    part_of = np.empty(len(members), dtype=np.int64)
    sub_affinity = affinity[np.ix_(members, members)]
    sub_loads = loads[members]
    for part, size in enumerate(part_sizes):
        seed = int(np.argmax(np.where(left, sub_loads, -np.inf)))
        left[seed] = False
        part_of[seed] = part
        pull = sub_affinity[seed].copy()
        load = sub_loads[seed]
        for _ in range(size - 1):
            fits = left & (load + sub_loads <= part_cap)
            if fits.any():
                pick = int(np.argmax(np.where(fits, pull + 1e-12 * sub_loads, -np.inf)))
            else:
                pick = int(np.argmin(np.where(left, sub_loads, np.inf)))
            left[pick] = False
            part_of[pick] = part
            pull += sub_affinity[pick]
            load += sub_loads[pick]
    return part_of


def grow_layer(affinity: np.ndarray, items: LayerItems, rank_nodes: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """Hierarchical greedy start: items grown into nodes, then into ranks inside each node."""
    num_nodes = int(rank_nodes.max()) + 1
    ranks_in_node = [np.flatnonzero(rank_nodes == n) for n in range(num_nodes)]
    everyone = np.arange(len(items.experts))
    node_of = grow_parts(affinity, items.loads, everyone,
                         [len(r) * slots_per_rank for r in ranks_in_node],
                         items.threshold * max(len(r) for r in ranks_in_node))
    ranks = np.empty(len(items.experts), dtype=np.int64)
    for node, node_ranks in enumerate(ranks_in_node):
        members = np.flatnonzero(node_of == node)
        part = grow_parts(affinity, items.loads, members, [slots_per_rank] * len(node_ranks),
                           items.threshold)
        ranks[members] = node_ranks[part]
    return ranks


def kicks_for(num_items: int) -> int:
    """Perturbation restarts per layer: many on small layers, none on large ones, where a
    restart costs more than it finds."""
    return min(100, 20_000 // (num_items * num_items))


def solve_training_layer(items: LayerItems, rank_nodes: np.ndarray, slots_per_rank: int,
                         deadline: Optional[float], max_moved: Optional[int], seed: int = 0) -> np.ndarray:
    """Greedy growth, continuation search, then iterated local search: rotate the ranks of a
    few random items and search again, keeping the result when it is cheaper."""
    rank_weight, node_weight = objective_weights("training")
    affinity = items.affinity()

    def search_from(start):
        return LayerSearch(start, items.loads, rank_nodes, items.threshold, items.excess_budget,
                           affinity, rank_weight, node_weight, home=items.home, max_moved=max_moved,
                           noise=items.noise)

    if items.home is not None:
        return warm_training_layer(items, search_from, rank_nodes, slots_per_rank, deadline, seed)
    best = search_from(grow_layer(affinity, items, rank_nodes, slots_per_rank))
    best.optimise(deadline)
    if not best.within_budget():
        # Continuation failed to reach the budget: fall back on balanced packing.
        best = search_from(items.ranks)
        best.improve(deadline)
    rng = np.random.default_rng(seed)
    V = len(items.experts)
    for _ in range(kicks_for(V)):
        if deadline is not None and time.perf_counter() > deadline:
            break
        ranks = best.rank.copy()
        chosen = rng.choice(V, min(V, 4), replace=False)
        ranks[chosen] = ranks[np.roll(chosen, 1)]
        trial = search_from(ranks)
        if not trial.repair():
            continue
        trial.improve(deadline)
        if trial.cost() < best.cost() - best.tolerance:
            best = trial
    return best.rank


def warm_training_layer(items: LayerItems, search_from, rank_nodes: np.ndarray, slots_per_rank: int,
                        deadline: Optional[float], seed: int) -> np.ndarray:
    """Re-place a layer moving few items: the best of (a) improving swaps from the previous
    placement, (b) the same after moving the most misplaced items in one assignment, and (c) a
    fresh solution relabelled to overlap the previous one most, brought back within the move
    budget, then improved."""
    from_home = search_from(items.home)
    from_home.repair()
    from_home.improve(deadline)
    cycled = search_from(items.home)
    cycled.reassign_most_misplaced(cycled.max_moved)
    if cycled.repair():
        cycled.improve(deadline)
        if cycled.moved <= cycled.max_moved and cycled.cost() < from_home.cost():
            from_home = cycled
    fresh = LayerItems(items.experts, items.loads, items.ranks, None, items.coactivation,
                       items.threshold, items.excess_budget, items.noise)
    fresh_ranks = solve_training_layer(fresh, rank_nodes, slots_per_rank, deadline, None, seed)
    relinked = search_from(align_ranks(fresh_ranks, items.home, rank_nodes))
    if relinked.reduce_moves():
        relinked.improve(deadline)
        if relinked.within_budget() and relinked.cost() < from_home.cost():
            return relinked.rank
    return from_home.rank


def align_ranks(ranks: np.ndarray, home: np.ndarray, rank_nodes: np.ndarray) -> np.ndarray:
    """Relabel ranks (whole nodes among equal-sized nodes, ranks inside a node), which changes
    no cost, so that the most items sit on their home rank. Exact: the best rank matching of
    every pair of nodes is an assignment problem, and so is the matching of nodes given those."""
    P = len(rank_nodes)
    overlap = np.zeros((P, P))
    np.add.at(overlap, (ranks, home), 1.0)
    num_nodes = int(rank_nodes.max()) + 1
    members = [np.flatnonzero(rank_nodes == n) for n in range(num_nodes)]
    matchings = {}
    value = np.full((num_nodes, num_nodes), -np.inf)
    for source in range(num_nodes):
        for target in range(num_nodes):
            if len(members[source]) != len(members[target]):
                continue
            block = overlap[np.ix_(members[source], members[target])]
            rows, cols = linear_sum_assignment(-block)
            matchings[source, target] = (members[source][rows], members[target][cols])
            value[source, target] = block[rows, cols].sum()
    _, node_target = linear_sum_assignment(-np.where(np.isfinite(value), value, -1e18))
    relabel = np.empty(P, dtype=np.int64)
    for source, target in enumerate(node_target):
        old, new = matchings[source, target]
        relabel[old] = new
    return relabel[ranks]


def hop_matrix(rank_nodes: np.ndarray, rank_weight: float, node_weight: float) -> np.ndarray:
    """[P, P]: the cost of a token moving from rank a to rank b between layers."""
    ranks = np.arange(len(rank_nodes))
    return (rank_weight * (ranks[:, None] != ranks[None, :])
            + node_weight * (rank_nodes[:, None] != rank_nodes[None, :]))


def inference_linear_cost(layer: int, layers: List[LayerItems], transitions: np.ndarray, hops: np.ndarray,
                          num_experts: int, use_next: bool = True) -> np.ndarray:
    """[V, P]: hop cost of each item of ``layer`` on each rank, the neighbour layers fixed."""
    P = hops.shape[0]
    per_expert = np.zeros((num_experts, P))
    if layer > 0:
        before = layers[layer - 1]
        shares = host_fractions(before.experts, num_experts, before.ranks, P)
        per_expert += transitions[layer - 1].T @ (shares @ hops)
    if use_next and layer + 1 < len(layers):
        after = layers[layer + 1]
        shares = host_fractions(after.experts, num_experts, after.ranks, P)
        per_expert += transitions[layer] @ (shares @ hops.T)
    items = layers[layer]
    replicas = np.bincount(items.experts, minlength=num_experts)[items.experts]
    return per_expert[items.experts] / replicas[:, None]


NODE_FIRST_WEIGHT = 16.0
"""Weight of a node hop in the node-first start (a rank hop weighs 1)."""
NODE_FIRST_MAX_ITEMS = 32
"""Layers of at most this many items also get the node-first start. Measured: 16 experts x 8
layers x 4 ranks (2 per node) 0.569 -> 0.536 hop cost; 64 experts x 16 layers x 16 ranks 0.4%
lower for twice the time; 256 experts x 16 layers x 64 ranks: the node-first start alone is 3% worse."""


def inference_hop_cost(layers: List[LayerItems], transitions: np.ndarray, hops: np.ndarray, num_experts: int) -> float:
    """Tokens times hops over every layer transition of the current placement."""
    shares = [host_fractions(i.experts, num_experts, i.ranks, hops.shape[0]) for i in layers]
    return sum(float(np.sum(transitions[l] * (shares[l] @ hops @ shares[l + 1].T))) for l in range(len(layers) - 1))


def solve_inference(trace: RoutingTrace, layers: List[LayerItems], rank_nodes: np.ndarray,
                    slots_per_rank: int, rank_weight: float, node_weight: float,
                    deadline: Optional[float], max_moved: Optional[int], progress: bool = False) -> dict:
    """``inference_search`` from balanced packing; on small multi-node instances also from a
    placement searched with node hops weighted ``NODE_FIRST_WEIGHT`` times (which settles the
    nodes before the ranks inside them), and where it fits from the chain program's placement,
    keeping the cheapest. Updates ``layers`` in place."""
    def search(weight: float, resume: bool = False) -> dict:
        return inference_search(trace, layers, rank_nodes, slots_per_rank, rank_weight, weight, deadline,
                                max_moved, progress, resume=resume)

    warm = layers[0].home is not None
    if warm:
        return search(node_weight)
    start = [i.ranks.copy() for i in layers]
    info = search(node_weight)
    transitions = trace.top1_transitions()
    hops = hop_matrix(rank_nodes, rank_weight, node_weight)
    best, best_cost = [i.ranks.copy() for i in layers], inference_hop_cost(layers, transitions, hops, trace.num_experts)

    def keep_if_cheaper(name: str) -> None:
        nonlocal best, best_cost
        cost = inference_hop_cost(layers, transitions, hops, trace.num_experts)
        info[name] = cost < best_cost and all(layer_search(items, rank_nodes).within_budget() for items in layers)
        if info[name]:
            best, best_cost = [i.ranks.copy() for i in layers], cost
        restore_best()

    def restore_best() -> None:
        for items, ranks in zip(layers, best):
            items.ranks = ranks.copy()

    def search_from_start(name: str, ranks: List[np.ndarray]) -> None:
        # A start balanced by another rule (the chain program's ignores sampling noise) is
        # repaired first, by the swaps that cost the fewest hops to the neighbouring layers.
        for items, layer_ranks in zip(layers, ranks):
            items.ranks = layer_ranks.copy()
        for layer, items in enumerate(layers):
            repair = layer_search(items, rank_nodes, inference_linear_cost(layer, layers, transitions, hops,
                                                                           trace.num_experts))
            if not repair.repair():
                info[name] = False
                restore_best()
                return
            items.ranks = repair.rank
        search(node_weight, resume=True)
        keep_if_cheaper(name)

    if rank_nodes.max() > 0 and len(layers[0].experts) <= NODE_FIRST_MAX_ITEMS:
        for items, ranks in zip(layers, start):
            items.ranks = ranks.copy()
        search(node_weight * NODE_FIRST_WEIGHT)
        search(node_weight, resume=True)
        keep_if_cheaper("node_first")
    if chain_start_fits(trace, layers, rank_nodes, deadline):
        from folding.placement.chain_bound import chain_program

        program = chain_program(transitions, trace.expert_counts().astype(np.float64),
                                [(i.threshold, i.excess_budget) for i in layers], len(rank_nodes),
                                int(np.sum(rank_nodes == 0)))
        search_from_start("chain_start", [ranks[items.experts] for items, ranks in zip(layers, program.ranks)])
    if node_split_fits(trace, layers, rank_nodes, deadline):
        from folding.placement.node_program import node_split_program

        ranks = node_split_program(
            np.stack([transitions[l][np.ix_(layers[l].experts, layers[l + 1].experts)] for l in range(len(layers) - 1)]),
            [i.loads for i in layers], [i.affinity() for i in layers],
            [(i.threshold, i.excess_budget) for i in layers], hops, int(np.sum(rank_nodes == 0)), layers[0].noise)
        if ranks is not None:
            search_from_start("node_split_start", ranks)
    return info


CHAIN_START_MAX_STATES = 4 ** 12
"""Instances of at most this many rank assignments (P^E) also search from the placement of
``chain_bound.chain_program``, which follows each layer pair's matching at least cost."""


def chain_start_fits(trace: RoutingTrace, layers: List[LayerItems], rank_nodes: np.ndarray,
                     deadline: Optional[float]) -> bool:
    """Whether the chain start applies (one item per expert, ranks in whole nodes, few enough
    states) and its estimated time (10 ns per state and line and layer) is left."""
    from folding.placement.chain_bound import applicable

    E, P = trace.num_experts, len(rank_nodes)
    per_node = int(np.sum(rank_nodes == 0))
    if len(layers[0].experts) != E or P % per_node or not applicable(E, P, per_node, CHAIN_START_MAX_STATES):
        return False
    seconds = 1e-8 * P ** E * E * (len(layers) - 1)
    return deadline is None or time.perf_counter() + seconds < deadline


def layer_search(items: LayerItems, rank_nodes: np.ndarray, linear: Optional[np.ndarray] = None) -> LayerSearch:
    """The search of one inference layer at its current ranks: balance limits, and hop costs
    to fixed neighbours as ``linear`` (``inference_linear_cost``)."""
    return LayerSearch(items.ranks, items.loads, rank_nodes, items.threshold, items.excess_budget,
                       items.affinity(), 0.0, 0.0, linear=linear, noise=items.noise)


def node_split_fits(trace: RoutingTrace, layers: List[LayerItems], rank_nodes: np.ndarray,
                    deadline: Optional[float]) -> bool:
    """Whether the node-split start applies (one item per expert, several whole nodes, few
    enough placements: ``node_program.applicable``) and its estimated time is left."""
    from folding.placement import node_program

    E, P = trace.num_experts, len(rank_nodes)
    per_node = int(np.sum(rank_nodes == 0))
    if len(layers[0].experts) != E or not node_program.applicable(E, P, per_node):
        return False
    seconds = node_program.estimated_seconds(E, P, per_node, len(layers))
    return deadline is None or time.perf_counter() + seconds < deadline


def inference_search(trace: RoutingTrace, layers: List[LayerItems], rank_nodes: np.ndarray,
                     slots_per_rank: int, rank_weight: float, node_weight: float,
                     deadline: Optional[float], max_moved: Optional[int], progress: bool = False,
                     max_passes: int = 8, seed: int = 0, resume: bool = False) -> dict:
    """Block coordinate descent over layers (see the module docstring), then iterated local
    search on small instances: rotate the ranks of a few items of a random layer, descend
    again, keep the result when the total hop cost drops. ``resume`` starts from the current
    placement instead of following layer 0 forward. Updates ``layers`` in place."""
    from tqdm import tqdm

    transitions = trace.top1_transitions()
    hops = hop_matrix(rank_nodes, rank_weight, node_weight)
    slot_ranks = np.repeat(np.arange(len(rank_nodes)), slots_per_rank)
    E, L = trace.num_experts, trace.num_layers
    warm = layers[0].home is not None
    large = is_large(L, len(layers[0].experts))
    assignment_helps = [True] * L
    out_of_time = lambda: deadline is not None and time.perf_counter() > deadline  # noqa: E731

    def place_layer(layer: int, use_next: bool) -> float:
        """Best placement of one layer with its neighbours fixed; returns the cost saved."""
        items = layers[layer]
        linear = inference_linear_cost(layer, layers, transitions, hops, E, use_next)
        current = float(linear[np.arange(len(items.ranks)), items.ranks].sum())
        best_ranks, best_cost = items.ranks, current
        affinity = items.affinity()

        def search_from(start):
            return LayerSearch(start, items.loads, rank_nodes, items.threshold, items.excess_budget,
                               affinity, 0.0, 0.0, linear=linear, home=items.home,
                               max_moved=max_moved, noise=items.noise)

        # The assignment optimum is brought within the balance bound by continuation; the
        # current placement, already within it, is only improved, except on the first pass,
        # where it is balanced packing and has nothing to keep unless the continuation fails.
        # A layer where the assignment lost to the current placement stops trying it: its
        # neighbours have settled. Large instances try it on the first pass only.
        searches = []
        tried = not warm and assignment_helps[layer] and not (use_next and large)
        if tried:
            _, slots = linear_sum_assignment(linear[:, slot_ranks])
            searches.append(search_from(slot_ranks[slots]))
            searches[-1].optimise(deadline)
        if use_next or not (tried and searches[0].within_budget()):
            searches.append(search_from(items.ranks))
            searches[-1].improve(deadline)
        winner = None
        for index, search in enumerate(searches):
            cost = search.cost()
            if search.within_budget() and cost < best_cost - search.tolerance:
                best_ranks, best_cost, winner = search.rank, cost, index
        if tried:
            assignment_helps[layer] = winner == 0
        items.ranks = best_ranks
        return current - best_cost

    def descend(passes: int, follow_first: bool, bar=None) -> int:
        """Passes over the layers, alternating direction, until one saves under 0.1% of the cost."""
        done = 0
        for done in range(1, passes + 1):
            following = follow_first and done == 1
            order = range(L) if done % 2 else range(L - 1, -1, -1)
            saved, before = 0.0, total_cost()
            for layer in order:
                if bar is not None:
                    bar.update(1)
                if out_of_time():
                    return done
                if not (following and layer == 0):
                    saved += place_layer(layer, use_next=not following)
            if not following and saved <= 1e-3 * before:
                break
        return done

    def total_cost() -> float:
        return inference_hop_cost(layers, transitions, hops, E)

    with tqdm(total=max_passes * L, desc="inference passes", disable=not progress, leave=False) as bar:
        passes = descend(max_passes, follow_first=not (warm or resume), bar=bar)
    kicks = 0 if warm else kicks_for(len(layers[0].experts))
    rng = np.random.default_rng(seed)
    best_cost, best_ranks = total_cost(), [i.ranks.copy() for i in layers]
    for _ in range(kicks):
        if out_of_time():
            break
        layer = int(rng.integers(L))
        items = layers[layer]
        chosen = rng.choice(len(items.ranks), min(len(items.ranks), 4), replace=False)
        ranks = items.ranks.copy()
        ranks[chosen] = ranks[np.roll(chosen, 1)]
        search = LayerSearch(ranks, items.loads, rank_nodes, items.threshold, items.excess_budget,
                             items.affinity(), noise=items.noise)
        if not search.repair():
            continue
        items.ranks = search.rank
        assignment_helps[:] = [True] * L
        descend(2, follow_first=False)
        cost = total_cost()
        if cost < best_cost - 1e-9 * trace.num_tokens:
            best_cost, best_ranks = cost, [i.ranks.copy() for i in layers]
        else:
            for items, ranks in zip(layers, best_ranks):
                items.ranks = ranks.copy()
    return {"passes": passes}


LARGE_INSTANCE = 4_000_000
"""Layers x items^2 (one swap-gain matrix per layer) from which an instance is large: training
layers are then placed by several processes (below it, starting them costs more than they
save), and later inference passes skip the assignment restarts (at DeepSeek-V3 scale, half
the time for 1.3% more hop cost)."""


def is_large(num_layers: int, num_items: int) -> bool:
    return num_layers * num_items * num_items >= LARGE_INSTANCE


def default_workers(num_layers: int, num_items: int) -> int:
    """Processes for the training objective: every available core on large instances, else 1."""
    if not is_large(num_layers, num_items):
        return 1
    return max(1, min(num_layers, len(os.sched_getaffinity(0))))


def _training_layer_job(job: tuple) -> Tuple[Optional[np.ndarray], float, int]:
    """One layer in a worker process: (ranks or None past the deadline, CPU seconds, pid)."""
    items, rank_nodes, slots_per_rank, deadline, max_moved, seed = job
    start = time.process_time()
    if deadline is not None and time.perf_counter() > deadline:
        return None, 0.0, os.getpid()
    ranks = solve_training_layer(items, rank_nodes, slots_per_rank, deadline, max_moved, seed)
    return ranks, time.process_time() - start, os.getpid()


def solve_training_layers(layers: List[LayerItems], rank_nodes: np.ndarray, slots_per_rank: int,
                          deadline: Optional[float], max_moved: Optional[int], workers: Optional[int],
                          progress: bool) -> dict:
    """Place every layer (they are independent under the training objective), in ``workers``
    processes when more than one; each layer's result is the same either way. Updates
    ``layers`` in place; a layer reached after the deadline keeps balanced packing. Returns
    ``stopped_at_layer`` where that happened and, with workers, ``worker_cpu_seconds``: CPU
    time per worker process, whose maximum is the solve's critical path."""
    from tqdm import tqdm

    if workers is None:
        workers = default_workers(len(layers), len(layers[0].experts))
    jobs = [(items, rank_nodes, slots_per_rank, deadline, max_moved, layer) for layer, items in enumerate(layers)]
    info: dict = {}
    with tqdm(total=len(jobs), desc="placing layers", disable=not progress, leave=False) as bar:
        if workers <= 1:
            results = []
            for job in jobs:
                results.append(_training_layer_job(job))
                bar.update(1)
        else:
            # fork where there is one: spawn would re-run a caller's unguarded script. The
            # workers only run numpy and scipy, so threads the caller holds do not matter.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
                futures = [pool.submit(_training_layer_job, job) for job in jobs]
                for future in as_completed(futures):
                    bar.update(1)
                results = [future.result() for future in futures]
            seconds: dict = {}
            for _, cpu, pid in results:
                seconds[pid] = seconds.get(pid, 0.0) + cpu
            info["worker_cpu_seconds"] = sorted(seconds.values(), reverse=True)
    for layer, (ranks, _, _) in enumerate(results):
        if ranks is None:
            info.setdefault("stopped_at_layer", layer)
        else:
            layers[layer].ranks = ranks
    return info


def solve(trace: RoutingTrace, ep_size: int, gpus_per_node: int, objective: str = "training",
          redundant: int = 0, time_limit: Optional[float] = None, previous: Optional[Placement] = None,
          max_moved: float = 0.1, balance_slack: float = DEFAULT_BALANCE_SLACK,
          sampling_noise: bool = True, progress: bool = False, workers: Optional[int] = None) -> SolveResult:
    """Place the experts of every layer of ``trace`` on ``ep_size`` ranks (see module docstring).

    ``sampling_noise=False`` balances the fitted loads only (the exact MILP's constraint).
    ``workers``: processes that place training layers side by side (None: ``default_workers``).
    """
    start = time.perf_counter()
    objective_weights(objective)
    check_sizes(trace.num_experts, ep_size, gpus_per_node, redundant)
    if previous is not None:
        previous.validate(num_experts=trace.num_experts, num_layers=trace.num_layers, ep_size=ep_size,
                          source="previous placement")
        if previous.redundant_slots != redundant:
            raise FoldingError(f"previous placement has {previous.redundant_slots} redundant slots per "
                               f"rank but {redundant} were asked for")
    deadline = None if time_limit is None else start + time_limit
    slots_per_rank = trace.num_experts // ep_size + redundant
    rank_nodes = np.arange(ep_size) // gpus_per_node
    layers = build_items(trace, ep_size, redundant, balance_slack, previous, sampling_noise)
    budget = None if previous is None else int(np.floor(max_moved * ep_size * slots_per_rank))
    info = {"objective": objective}
    if objective == "training":
        info.update(solve_training_layers(layers, rank_nodes, slots_per_rank, deadline, budget,
                                          workers, progress))
    else:
        rank_weight, node_weight = objective_weights("inference")
        info.update(solve_inference(trace, layers, rank_nodes, slots_per_rank, rank_weight, node_weight,
                                    deadline, budget, progress))
    placement = Placement.from_rank_assignment(trace.num_experts, ep_size, gpus_per_node,
                                               [i.experts for i in layers], [i.ranks for i in layers])
    return SolveResult(placement, time.perf_counter() - start, info)
