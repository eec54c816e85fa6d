"""Exact placement of small instances by mixed-integer programming (HiGHS via scipy), to
certify how far the fast solver is from the optimum.

Without replicas, both objectives are linear once products of assignment variables are
linearised:

- training, per layer (layers are independent): x[e, r] = 1 if expert e sits on rank r; for
  each distinct top-k set s of the layer (with c_s tokens), y[s, r] >= x[e, r] for e in s says
  rank r receives the set, z[s, n] >= sum over r in node n of x[e, r] likewise for nodes.
  Cost sum_s c_s (w_rank sum_r y + w_node sum_n z) / tokens = D_gpu + 4 D_node of the layer.
- inference, all layers at once: for each pair of consecutive layers and each host level (rank,
  and node when there are several), w[i, j] = 1 if expert i and expert j of the next layer share
  a host; sharing a rank implies sharing its node. The cost is all transitions times
  (w_rank + w_node) minus the flow on shared hosts, over the number of transitions. The degree
  rows (each expert shares its host with as many experts of the other layer as the host has
  slots) are what lift the relaxation: on 16 experts x 8 layers x 4 ranks its bound is 0.31 at
  the root, where bounding each host's stays by the flows alone gave 0 (and 0.22 after 400 s of
  branching). It stays weak: the relaxation sees each layer pair apart, while a placement has to
  follow one assignment through all layers, and that is where the cost lies. ``chain_bound``
  prices that exactly for the flow along each layer pair's matching and reaches 0.47 there.

Balance: sum over ranks of max(load_r - t, 0) <= budget with t and budget from
``problem.balance_limits``. Without sampling noise that is exactly the fast solver's constraint
(``solve(..., sampling_noise=False)``), so the two solve the same problem. With noise, the
fast solver bounds sum_r E[(X_r - t)+] >= sum_r (load_r - t)+ (Jensen), so the MILP with the
same t and budget is a relaxation and its bound is a lower bound for the fast solver's problem.
Ranks inside a node, and nodes, are interchangeable when the ranks fill whole nodes; the
labelling is then fixed (``_assignment``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from folding.errors import FoldingError
from folding.placement.metrics import evaluate, objective_weights
from folding.placement.placement import Placement
from folding.placement.problem import DEFAULT_BALANCE_SLACK, check_sizes, expert_balance_limits
from folding.placement.trace import RoutingTrace

MAX_VARIABLES = 20_000


def check_size(variables: int) -> None:
    if variables > MAX_VARIABLES:
        raise FoldingError(f"the exact MILP would need {variables} variables (at most {MAX_VARIABLES}): "
                           f"use it on small instances only")


@dataclass
class MilpResult:
    """The MILP's best placement, its cost, and the proven lower bound."""

    placement: Optional[Placement]
    """The best placement found (None: the time limit came first)."""
    cost: float
    """Cost of the best placement found on the trace (``PlacementMetrics.cost``; nan without one)."""
    bound: float
    """Proven lower bound on the optimum."""
    optimal: bool
    seconds: float

    @property
    def gap(self) -> float:
        """The MILP's own relative gap between its placement and its bound."""
        return (self.cost - self.bound) / self.bound if self.bound > 0 else 0.0


class _Model:
    """Sparse rows, bounds and costs of a MILP, built column by column."""

    def __init__(self):
        self.cost: List[float] = []
        self.upper: List[float] = []
        self.integer: List[int] = []
        self.rows, self.cols, self.vals, self.low, self.high = [], [], [], [], []

    def variables(self, count: int, cost=0.0, upper=1.0, integer=False) -> np.ndarray:
        start = len(self.cost)
        self.cost.extend(np.broadcast_to(np.asarray(cost, dtype=float), (count,)).tolist())
        self.upper.extend([upper] * count)
        self.integer.extend([1 if integer else 0] * count)
        return np.arange(start, start + count)

    def row(self, columns, values, low=-np.inf, high=np.inf) -> None:
        index = len(self.low)
        columns = np.atleast_1d(columns)
        self.rows.extend([index] * len(columns))
        self.cols.extend(np.asarray(columns).tolist())
        self.vals.extend(np.broadcast_to(np.asarray(values, dtype=float), (len(columns),)).tolist())
        self.low.append(low)
        self.high.append(high)

    def solve(self, time_limit: float, relax: bool = False):
        """HiGHS on the model; ``relax`` drops integrality (the LP relaxation)."""
        matrix = coo_matrix((self.vals, (self.rows, self.cols)), shape=(len(self.low), len(self.cost))).tocsr()
        integer = np.zeros(len(self.cost)) if relax else np.array(self.integer)
        return milp(np.array(self.cost), integrality=integer,
                    bounds=Bounds(np.zeros(len(self.cost)), np.array(self.upper)),
                    constraints=LinearConstraint(matrix, np.array(self.low), np.array(self.high)),
                    options={"time_limit": time_limit, "mip_rel_gap": 1e-6, "disp": False})


def _assignment(model: _Model, experts: int, ranks: int, slots: int, loads: np.ndarray,
                threshold: float, budget: float, rank_nodes: Optional[np.ndarray]) -> np.ndarray:
    """x[e, r] with one rank per expert, ``slots`` experts per rank, and the balance rows.

    With ``rank_nodes`` (ranks filling whole nodes) the labelling is made canonical: inside a
    node, ranks hold increasing smallest experts, and so do the first ranks of the nodes.
    """
    x = model.variables(experts * ranks, integer=True).reshape(experts, ranks)
    for e in range(experts):
        model.row(x[e], 1.0, 1.0, 1.0)
    for r in range(ranks):
        model.row(x[:, r], 1.0, slots, slots)
    if np.isfinite(threshold) and np.isfinite(budget):
        over = model.variables(ranks, upper=np.inf)
        for r in range(ranks):
            # over_r >= load_r - t
            model.row(np.append(x[:, r], over[r]), np.append(-loads, 1.0), -threshold, np.inf)
        model.row(over, 1.0, -np.inf, budget)
    if rank_nodes is not None:
        firsts = [int(np.flatnonzero(rank_nodes == n)[0]) for n in range(int(rank_nodes.max()) + 1)]
        ordered = [(r, r + 1) for r in range(ranks - 1) if rank_nodes[r] == rank_nodes[r + 1]]
        ordered += list(zip(firsts[:-1], firsts[1:]))
        for low, high in ordered:
            for e in range(experts):
                # x[e, high] <= sum over e' < e of x[e', low]
                model.row(np.append(x[e, high], x[:e, low]), np.append(1.0, -np.ones(e)), -np.inf, 0.0)
    return x


def _same_host_pairs(model: _Model, flow: np.ndarray, weight: float, before: np.ndarray, after: np.ndarray,
                     hosts: List[np.ndarray], slots: int) -> np.ndarray:
    """Variables w[i, j] = 1 if expert i of one layer and expert j of the next share a host (a
    rank, or a node), rewarded by ``weight`` per token of ``flow[i, j]``; returns w [E, E].

    ``before`` / ``after``: the x variables [E, P] of the two layers; ``hosts``: the ranks of
    each host. w[i, j] <= 1 - |x_l[i, h] - x_l+1[j, h]| for every host h forbids sharing where
    the hosts differ, and every expert shares its host with exactly as many experts of the other
    layer as the host has slots. Those degree rows make the relaxation useful: without them
    x = 1/H lets every token stay.
    """
    E = flow.shape[0]
    w = model.variables(E * E, cost=-weight * flow.ravel()).reshape(E, E)
    capacity = np.zeros(before.shape[1])
    for ranks in hosts:
        capacity[ranks] = len(ranks) * slots
        ones = np.ones(len(ranks))
        for i in range(E):
            for j in range(E):
                columns = np.concatenate(([w[i, j]], before[i, ranks], after[j, ranks]))
                model.row(columns, np.concatenate(([1.0], ones, -ones)), -np.inf, 1.0)
                model.row(columns, np.concatenate(([1.0], -ones, ones)), -np.inf, 1.0)
    for i in range(E):
        # sum_j w[i, j] = slots on i's host, and likewise from the other layer's side
        model.row(np.concatenate((w[i], before[i])), np.concatenate((np.ones(E), -capacity)), 0.0, 0.0)
        model.row(np.concatenate((w[:, i], after[i])), np.concatenate((np.ones(E), -capacity)), 0.0, 0.0)
    return w


def _ranks_of(solution: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.argmax(np.round(solution[x]), axis=1)


def _check(trace: RoutingTrace, ep_size: int, gpus_per_node: int, redundant: int) -> None:
    check_sizes(trace.num_experts, ep_size, gpus_per_node, redundant)
    if redundant:
        raise FoldingError("the exact MILP handles placements without redundant slots only "
                           "(--redundant 0)")


def solve_training_milp(trace: RoutingTrace, ep_size: int, gpus_per_node: int, redundant: int = 0,
                        balance_slack: float = DEFAULT_BALANCE_SLACK, time_limit: float = 60.0,
                        sampling_noise: bool = False) -> MilpResult:
    """Exact training placement, layer by layer; ``time_limit`` is shared by all layers."""
    _check(trace, ep_size, gpus_per_node, redundant)
    start = time.perf_counter()
    E, L, T, P = trace.num_experts, trace.num_layers, trace.num_tokens, ep_size
    slots = E // P
    rank_weight, node_weight = objective_weights("training")
    rank_nodes = np.arange(P) // gpus_per_node
    num_nodes = int(rank_nodes.max()) + 1
    canonical = rank_nodes if P % gpus_per_node == 0 or num_nodes == 1 else None
    counts = trace.expert_counts()
    bound = 0.0
    optimal = True
    rows = []
    layer_sets = [np.unique(np.sort(trace.topk[layer], axis=1), axis=0, return_counts=True) for layer in range(L)]
    check_size(max(E * P + len(sets) * (P + num_nodes) + P for sets, _ in layer_sets))
    for layer, (sets, weight) in enumerate(layer_sets):
        model = _Model()
        threshold, budget = expert_balance_limits(trace, layer, counts[layer], P, slots, balance_slack,
                                                  sampling_noise)
        x = _assignment(model, E, P, slots, counts[layer].astype(float), threshold, budget, canonical)
        y = model.variables(len(sets) * P, cost=np.repeat(weight * rank_weight / T, P)).reshape(len(sets), P)
        for s, members in enumerate(sets):
            for e in members:
                for r in range(P):
                    model.row([y[s, r], x[e, r]], [1.0, -1.0], 0.0, np.inf)
        constant = 0.0
        if num_nodes > 1:
            z = model.variables(len(sets) * num_nodes,
                                cost=np.repeat(weight * node_weight / T, num_nodes)).reshape(len(sets), num_nodes)
            for s, members in enumerate(sets):
                for e in members:
                    for n in range(num_nodes):
                        ranks = np.flatnonzero(rank_nodes == n)
                        model.row(np.append(z[s, n], x[e, ranks]), np.append(1.0, -np.ones(len(ranks))), 0.0, np.inf)
        else:
            constant = node_weight
        remaining = max(time_limit - (time.perf_counter() - start), 1.0) / (L - layer)
        result = model.solve(remaining)
        if result.x is None:
            raise FoldingError(f"the exact MILP found no placement for layer {layer} in {remaining:.0f} s")
        optimal &= result.status == 0
        bound += getattr(result, "mip_dual_bound", result.fun) + constant
        rows.append(_ranks_of(result.x, x))
    placement = Placement.from_rank_assignment(E, P, gpus_per_node, [np.arange(E)] * L, rows)
    return MilpResult(placement, evaluate(placement, trace).cost("training"), bound / L, optimal,
                      time.perf_counter() - start)


def solve_inference_milp(trace: RoutingTrace, ep_size: int, gpus_per_node: int, redundant: int = 0,
                         balance_slack: float = DEFAULT_BALANCE_SLACK, time_limit: float = 60.0,
                         sampling_noise: bool = False) -> MilpResult:
    """Exact inference placement of all layers together."""
    _check(trace, ep_size, gpus_per_node, redundant)
    if trace.num_layers < 2:
        raise FoldingError("the inference objective needs at least two MoE layers")
    start = time.perf_counter()
    E, L, T, P = trace.num_experts, trace.num_layers, trace.num_tokens, ep_size
    slots = E // P
    rank_weight, node_weight = objective_weights("inference")
    rank_nodes = np.arange(P) // gpus_per_node
    num_nodes = int(rank_nodes.max()) + 1
    counts = trace.expert_counts()
    transitions = trace.top1_transitions()
    check_size(L * (E * P + P) + (L - 1) * E * E * (2 if num_nodes > 1 else 1))
    model = _Model()
    xs = []
    for layer in range(L):
        threshold, budget = expert_balance_limits(trace, layer, counts[layer], P, slots, balance_slack,
                                                  sampling_noise)
        canonical = rank_nodes if layer == 0 and (P % gpus_per_node == 0 or num_nodes == 1) else None
        xs.append(_assignment(model, E, P, slots, counts[layer].astype(float), threshold, budget, canonical))
    scale = (L - 1) * T
    constant = float(transitions.sum()) * (rank_weight + (node_weight if num_nodes > 1 else 0.0)) / scale
    rank_hosts = [np.array([r]) for r in range(P)]
    node_hosts = [np.flatnonzero(rank_nodes == n) for n in range(num_nodes)]
    for layer in range(L - 1):
        flow = transitions[layer] / scale
        same_rank = _same_host_pairs(model, flow, rank_weight, xs[layer], xs[layer + 1], rank_hosts, slots)
        if num_nodes > 1:
            same_node = _same_host_pairs(model, flow, node_weight, xs[layer], xs[layer + 1], node_hosts, slots)
            for i in range(E):
                for j in range(E):
                    # sharing a rank is sharing its node
                    model.row([same_rank[i, j], same_node[i, j]], [1.0, -1.0], -np.inf, 0.0)
    result = model.solve(max(time_limit - (time.perf_counter() - start), 1.0))
    bound = getattr(result, "mip_dual_bound", None)
    if result.x is None:
        # HiGHS reports no bound without a placement; the LP relaxation's is proven all the same.
        if bound is None or not np.isfinite(bound):
            relaxation = model.solve(max(time_limit, 60.0), relax=True)
            if relaxation.x is None:
                raise FoldingError(f"the exact MILP found neither a placement nor a bound in {time_limit:.0f} s")
            bound = relaxation.fun
        return MilpResult(None, float("nan"), bound + constant, False, time.perf_counter() - start)
    rows = [_ranks_of(result.x, x) for x in xs]
    placement = Placement.from_rank_assignment(E, P, gpus_per_node, [np.arange(E)] * L, rows)
    bound = result.fun if bound is None else bound
    return MilpResult(placement, evaluate(placement, trace).cost("inference"), bound + constant,
                      result.status == 0, time.perf_counter() - start)


def solve_milp(trace: RoutingTrace, ep_size: int, gpus_per_node: int, objective: str = "training",
               redundant: int = 0, balance_slack: float = DEFAULT_BALANCE_SLACK,
               time_limit: float = 60.0, sampling_noise: bool = False) -> MilpResult:
    """The exact placement; with ``sampling_noise`` the balance rows relax the fast solver's
    default constraint (a lower bound), without they equal its noise-free constraint."""
    objective_weights(objective)
    method = solve_training_milp if objective == "training" else solve_inference_milp
    return method(trace, ep_size, gpus_per_node, redundant, balance_slack, time_limit, sampling_noise)
