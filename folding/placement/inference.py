"""The inference objective's search over all layers at once, and the state of one inference
solve (``InferenceRun``) that the starts (``starts``) search with.

With the neighbouring layers fixed, placing one layer is a linear assignment problem (each
item's cost on each rank is its hop cost to the neighbours' hosts: ``inference_linear_cost``),
solved by ``scipy.optimize.linear_sum_assignment`` and then brought within the balance bound by
swap local search (``search.LayerSearch``). ``inference_search`` is block coordinate descent
over layers: a forward pass follows the layer before; later passes use both neighbours until
none improves (on large instances they only improve the current placement by swaps); small
instances then get iterated local search over layers. With a previous placement it starts from
it and moves at most ``max_moved`` of each layer's items.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import List, Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

from folding.placement.placement import host_fractions
from folding.placement.problem import LayerItems, hop_matrix
from folding.placement.search import LayerSearch, is_large, kicks_for
from folding.placement.trace import RoutingTrace


@dataclass
class InferenceRun:
    """One inference solve: the instance, its layers (whose ranks every search updates in
    place) and the search's settings."""

    trace: RoutingTrace
    layers: List[LayerItems]
    rank_nodes: np.ndarray
    slots_per_rank: int
    rank_weight: float
    node_weight: float
    deadline: Optional[float] = None
    max_moved: Optional[int] = None
    progress: bool = False

    @property
    def warm(self) -> bool:
        """Whether the layers start from a previous placement."""
        return self.layers[0].home is not None

    @property
    def gpus_per_node(self) -> int:
        return int(np.sum(self.rank_nodes == 0))

    @cached_property
    def transitions(self) -> np.ndarray:
        return self.trace.top1_transitions()

    @cached_property
    def hops(self) -> np.ndarray:
        return hop_matrix(self.rank_nodes, self.rank_weight, self.node_weight)

    @property
    def one_item_per_expert(self) -> bool:
        return len(self.layers[0].experts) == self.trace.num_experts

    def limits(self) -> List[tuple]:
        """Each layer's (threshold, excess budget)."""
        return [(items.threshold, items.excess_budget) for items in self.layers]

    def has_time_for(self, seconds: float) -> bool:
        return self.deadline is None or time.perf_counter() + seconds < self.deadline

    def ranks(self) -> List[np.ndarray]:
        return [items.ranks.copy() for items in self.layers]

    def set_ranks(self, ranks: List[np.ndarray]) -> None:
        for items, layer_ranks in zip(self.layers, ranks):
            items.ranks = layer_ranks.copy()

    def cost(self) -> float:
        """Tokens times hops of the current placement (``inference_hop_cost``)."""
        return inference_hop_cost(self.layers, self.transitions, self.hops, self.trace.num_experts)

    def within_limits(self) -> bool:
        """Whether every layer's excess is within its budget."""
        return all(layer_search(items, self.rank_nodes).within_budget() for items in self.layers)

    def search(self, node_weight: Optional[float] = None, resume: bool = False) -> dict:
        """``inference_search`` of the layers, node hops weighted ``node_weight`` (None: the
        objective's)."""
        return inference_search(self.trace, self.layers, self.rank_nodes, self.slots_per_rank, self.rank_weight,
                                self.node_weight if node_weight is None else node_weight, self.deadline,
                                self.max_moved, self.progress, resume=resume)

    def search_from(self, ranks: List[np.ndarray]) -> dict:
        """Search from a placement balanced by another rule (the chain program's ignores
        sampling noise): each layer is repaired first, by the swaps that cost the fewest hops to
        its neighbours, then the search resumes from there. A placement that cannot be repaired
        is left as it is, unsearched, for the caller to reject (``within_limits``)."""
        self.set_ranks(ranks)
        for layer, items in enumerate(self.layers):
            repair = layer_search(items, self.rank_nodes, inference_linear_cost(
                layer, self.layers, self.transitions, self.hops, self.trace.num_experts))
            if not repair.repair():
                return {}
            items.ranks = repair.rank
        return self.search(resume=True)


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


def inference_hop_cost(layers: List[LayerItems], transitions: np.ndarray, hops: np.ndarray, num_experts: int) -> float:
    """Tokens times hops over every layer transition of the current placement."""
    shares = [host_fractions(i.experts, num_experts, i.ranks, hops.shape[0]) for i in layers]
    return sum(float(np.sum(transitions[l] * (shares[l] @ hops @ shares[l + 1].T))) for l in range(len(layers) - 1))


def layer_search(items: LayerItems, rank_nodes: np.ndarray, linear: Optional[np.ndarray] = None) -> LayerSearch:
    """The search of one inference layer at its current ranks: balance limits, and hop costs
    to fixed neighbours as ``linear`` (``inference_linear_cost``)."""
    return items.search(items.ranks, rank_nodes, 0.0, 0.0, linear=linear)


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
            return items.search(start, rank_nodes, 0.0, 0.0, linear=linear, home=items.home,
                                max_moved=max_moved, affinity=affinity)

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
        search = items.search(ranks, rank_nodes, rank_weight=1.0, node_weight=0.0)
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
