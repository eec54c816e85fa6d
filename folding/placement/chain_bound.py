"""A proven lower bound on the inference objective of small instances, by dynamic programming
over every layer's balanced placements; the bench's certificate and ``folding place --certify``
report it next to the MILP's bound.

The inference cost is a sum over consecutive layers of top-1 flows F_l[i, j] times the hop cost
between the ranks of i and j. Split each F_l into its matching part (the flow from each expert
to the follower that a maximum-weight matching of F_l gives it: most tokens that follow their
expert go to one expert of the next layer) and the rest.

- Matching part: follow each expert of layer 0 along the matchings (a "line"); the part is then
  a sum over lines of flow times the hop cost between the line's ranks at consecutive layers,
  separable by line. Its least value over sequences of balanced placements is exact dynamic
  programming over all P^E rank assignments of the lines: from one layer to the next, one
  min-plus pass per line (a distance transform), then every state outside the next layer's
  balanced placements is dropped. The MILP's relaxation cannot see this price: fractional
  placements follow every line for free.
- The program charges only ``LINE_SHARE`` of each matched flow. The remainder and the rest of
  a layer pair, given one layer's placement, cost at least their least value with the other
  layer relaxed to E/P experts per rank (a linear assignment). Half of that bound from each
  side of the pair is charged to every balanced placement of the two layers, inside the
  dynamic program, so the rest is priced at the placements the chain goes through. The
  remainder is what keeps the relaxed layer on the lines: without it, it would place every
  expert where the other layer's rest flow is cheapest, and leave the matched flow to the
  program (0.43 on 16 experts x 8 layers x 4 ranks, against 0.47 with it).

The program's minimum is then a lower bound on the optimum, and its cheapest chain a placement.
Balance is the MILP's rule (``milp`` explains it): exactly the fast solver's without sampling
noise, a relaxation of it with noise, so the bound holds for both. States take 2 bytes (4 when
2 do not hold the costs): 4^16 states are 8.6 GB, and 16 experts x 8 layers x 4 ranks take
about 10 minutes of dynamic program on 2 cores with numba (``pip install 'folding[certify]'``)
plus several of linear assignments (17 to 40 minutes in all on cores shared with other work);
without numba, instances of at most 2^24 states.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from scipy.optimize import linear_sum_assignment

from folding.errors import FoldingError
from folding.placement.metrics import evaluate, objective_weights
from folding.placement.placement import Placement
from folding.placement.problem import (DEFAULT_BALANCE_SLACK, check_sizes, expert_balance_limits,
                                       hop_matrix, ordered_partitions)
from folding.placement.trace import RoutingTrace

MAX_STATES = 4 ** 16
"""Largest P^E the dynamic program takes (8.6 GB of states)."""
MAX_STATES_WITHOUT_NUMBA = 2 ** 24
MAX_FIRST_RANK_SETS = 20_000
"""Most choices of rank 0's experts the enumeration of balanced placements loops over."""
LINE_SHARE = 0.92
"""Share of each matched flow that the dynamic program charges; the linear assignments price
the remainder with the rest of the pair, where it keeps the other layer on the lines. Measured
on the 8-layer certificate instance at 12 experts: 1.0 gives 0.458, 0.9 0.503, 0.93 0.503, 0.8
0.490, 0.6 0.461 (the chain's placement costs 0.513); at 16 experts 0.92 gives 0.468 (1.0 gave
0.427; the placement costs 0.475)."""


@dataclass
class ChainBound:
    """The bound, its two parts, and the placement that attains it."""

    bound: float
    """Proven lower bound on the inference cost of any balanced placement."""
    matching: float
    """The program's share of the matched flows (``line_parts``), at ``placement``."""
    rest: float
    """The bound on everything else at ``placement``: ``bound`` - ``matching``."""
    placement: Placement
    """The placement that attains the bound: its cost is an upper bound on the optimum."""
    placement_cost: float
    seconds: float


def _state_limit(ep_size: int, gpus_per_node: int) -> int:
    return MAX_STATES if _numba_transform(ep_size, gpus_per_node) is not None else MAX_STATES_WITHOUT_NUMBA


def applicable(num_experts: int, ep_size: int, gpus_per_node: int, max_states: Optional[int] = None) -> bool:
    """Whether the dynamic program takes this many states (more with numba than without) and
    the enumeration this many choices of rank 0's experts."""
    if max_states is None:
        max_states = _state_limit(ep_size, gpus_per_node)
    return (ep_size ** num_experts <= max_states
            and math.comb(num_experts, num_experts // ep_size) <= MAX_FIRST_RANK_SETS)


def available_memory() -> Optional[int]:
    """Bytes the kernel reports available (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(needed: int) -> None:
    """Refuse before allocating the states when they would not fit in memory."""
    available = available_memory()
    if available is not None and needed > available:
        raise FoldingError(f"the chain bound needs {needed / 2 ** 20:,.0f} MiB for its states and "
                           f"{available / 2 ** 20:,.0f} MiB are available")


def hop_costs(ep_size: int, gpus_per_node: int) -> np.ndarray:
    """int64 [P, P]: the solver's inference hop costs, which must be integers here."""
    hops = hop_matrix(np.arange(ep_size) // gpus_per_node, *objective_weights("inference"))
    if not np.array_equal(hops, np.round(hops)):
        raise FoldingError("the chain bound needs integer hop weights")
    return hops.astype(np.int64)


def balanced_states(loads: np.ndarray, ep_size: int, threshold: float, budget: float,
                    positions: np.ndarray) -> np.ndarray:
    """uint64: the state index (sum of rank * P^position over experts) of every assignment of
    E/P experts per rank with sum_r max(load_r - threshold, 0) <= budget, in increasing order.
    ``positions[e]``: expert e's digit in the state."""
    E, P = len(loads), ep_size
    S = E // P
    place = np.uint64(P) ** positions.astype(np.uint64)
    rest = ordered_partitions(E - S, P - 1, S) if P > 1 else np.zeros((1, 0, S), np.int64)
    found = []
    for first in itertools.combinations(range(E), S):
        first = np.array(first)
        groups = np.setdiff1d(np.arange(E), first)[rest]            # [N, P-1, S]
        excess = (np.maximum(loads[groups].sum(axis=2) - threshold, 0.0).sum(axis=1)
                  + max(loads[first].sum() - threshold, 0.0))
        keep = excess <= budget + 1e-9 * max(1.0, budget)
        if keep.any():
            values = place[groups[keep]].sum(axis=2)                 # [n, P-1]
            found.append((values * np.arange(1, P, dtype=np.uint64)).sum(axis=1))
    states = np.concatenate(found) if found else np.zeros(0, np.uint64)
    return np.sort(states)


def state_digits(states: np.ndarray, num_digits: int, base: int) -> np.ndarray:
    """int64 [N, num_digits]: the rank of each position in each state."""
    powers = np.uint64(base) ** np.arange(num_digits, dtype=np.uint64)
    return ((states[:, None] // powers[None, :]) % np.uint64(base)).astype(np.int64)


def _transform_numpy(values: np.ndarray, base: int, stride: int, group: int, near, far) -> None:
    """In place, along the digit of ``stride``: values[x] = min(values[x], near + least value on
    x's node, far + least value anywhere). With hops of ``near`` inside a node and ``far``
    across, that is the min-plus pass min over y of values[y] + hop(x, y)."""
    view = values.reshape(-1, base, stride)
    step = max(1, (1 << 22) // (base * stride))
    for start in range(0, view.shape[0], step):
        block = view[start:start + step]
        anywhere = block.min(axis=1) + far
        for first in range(0, base, group):
            node = block[:, first:first + group]
            reach = np.minimum(node.min(axis=1) + near, anywhere)
            np.minimum(node, reach[:, None, :], out=node)


@functools.lru_cache(maxsize=None)
def _numba_transform(base: int, group: int):
    """The same pass compiled with numba for ``base`` ranks in nodes of ``group`` (constants,
    so that the loops over ranks unroll), parallel over lines; None without numba."""
    try:
        from numba import njit, prange
    except ImportError:
        return None

    @njit(inline="always")
    def line(values, first, stride, near, far):  # pragma: no cover - compiled
        anywhere = values[first]
        for y in range(1, base):
            anywhere = min(anywhere, values[first + y * stride])
        anywhere = anywhere + far
        for node in range(0, base, group):
            least = values[first + node * stride]
            for y in range(node + 1, min(base, node + group)):
                least = min(least, values[first + y * stride])
            reach = min(least + near, anywhere)
            for x in range(node, min(base, node + group)):
                values[first + x * stride] = min(values[first + x * stride], reach)

    @njit(parallel=True)
    def transform(values, stride, near, far):  # pragma: no cover - compiled
        block = base * stride
        blocks = values.size // block
        if blocks >= 64:
            for b in prange(blocks):
                for k in range(stride):
                    line(values, b * block + k, stride, near, far)
        else:
            for b in range(blocks):
                for k in prange(stride):
                    line(values, b * block + k, stride, near, far)

    return lambda values, _, stride, __, near, far: transform(values, stride, near, far)


def matching_lines(transitions: np.ndarray) -> tuple:
    """(followers [L-1, E], lines [L, E]): the maximum-weight matching of each layer pair's
    flows, and the expert of each line at each layer (line k is expert k at layer 0)."""
    followers, lines = [], [np.arange(transitions.shape[1])]
    for flow in transitions:
        rows, cols = linear_sum_assignment(-flow)
        follower = np.empty_like(rows)
        follower[rows] = cols
        followers.append(follower)
        lines.append(follower[lines[-1]])
    return np.array(followers, dtype=np.int64), np.array(lines, dtype=np.int64)


def line_parts(transitions: np.ndarray, followers: np.ndarray, share: float) -> np.ndarray:
    """int64 [L-1, E]: the part of each expert's flow to its follower that the dynamic program
    charges, ``share`` of it rounded down (what is left stays integer)."""
    E = transitions.shape[1]
    matched = np.stack([flow[np.arange(E), follower] for flow, follower in zip(transitions, followers)])
    return np.floor(share * np.rint(matched)).astype(np.int64)


def rest_by_state(rest_flow: np.ndarray, states: np.ndarray, positions: np.ndarray, ep_size: int,
                  hops: np.ndarray, transpose: bool) -> np.ndarray:
    """int64, per placement of one layer (``states``): the least sum_ij rest_flow[i, j]
    hops[rank_i, rank_j] with the other layer relaxed to E/P experts per rank (a linear
    assignment); ``transpose``: the states belong to the second layer of the pair."""
    E, P = rest_flow.shape[0], ep_size
    flow = rest_flow.T if transpose else rest_flow
    out = np.empty(len(states), dtype=np.int64)
    for start in range(0, len(states), 8192):
        ranks = state_digits(states[start:start + 8192], E, P)[:, positions]   # rank of each expert
        # cost[n, j, h] = sum_i flow[i, j] hops[rank_n(i), h]
        cost = np.einsum("ij,nih->njh", flow, hops[ranks])
        for n, matrix in enumerate(np.rint(cost).astype(np.int64)):
            rows, cols = linear_sum_assignment(np.repeat(matrix, E // P, axis=1))
            out[start + n] = matrix[rows, cols // (E // P)].sum()
    return out


@dataclass
class ChainProgram:
    """What the dynamic program leaves: its least total and a placement attaining it."""

    least: float
    """Least matching part plus unary costs over sequences of balanced placements, in token hops."""
    ranks: List[np.ndarray]
    """Per layer, the rank of every expert."""
    states: List[np.ndarray]
    """Per layer, its balanced placements (``balanced_states``)."""
    positions: List[np.ndarray]
    """Per layer, each expert's digit in the states (its line)."""
    followers: np.ndarray
    """[L-1, E]: each layer pair's matching."""


def chain_program(transitions: np.ndarray, counts: np.ndarray, limits: List[tuple], ep_size: int,
                  gpus_per_node: int, progress: bool = False, unary=None, line_share: float = 1.0) -> ChainProgram:
    """The matching part's dynamic program (module docstring) on integer top-1 ``transitions``
    [L-1, E, E], expert ``counts`` [L, E] and each layer's (threshold, budget), charging
    ``line_parts`` of the matched flows. ``unary``: a function (layer, states, positions) ->
    int64 cost of each state, added to the program."""
    from tqdm import tqdm

    L, E = counts.shape
    P = ep_size
    transform = _numba_transform(P, gpus_per_node)
    if not applicable(E, P, gpus_per_node):
        hint = "" if transform is not None else " (install numba for up to 4^16)"
        raise FoldingError(f"the chain bound would need {P}^{E} states (at most {_state_limit(P, gpus_per_node)}) "
                           f"and {math.comb(E, E // P)} choices of rank 0's experts (at most "
                           f"{MAX_FIRST_RANK_SETS}){hint}")
    if not np.allclose(transitions, np.round(transitions)):
        raise FoldingError("the chain bound needs integer token flows")
    hops = hop_costs(P, gpus_per_node)
    # a hop inside a node costs the rank weight, across nodes the most
    near_weight, far_weight = int(objective_weights("inference")[0]), int(hops.max())
    followers, lines = matching_lines(transitions)
    parts = line_parts(transitions, followers, line_share)
    line_flows = np.stack([parts[l][lines[l]] for l in range(L - 1)])
    largest = int(line_flows.max(initial=0)) * far_weight
    dtype = np.uint16 if int(line_flows.sum()) * far_weight + 2 * largest < 60_000 else np.uint32
    infinity = np.iinfo(dtype).max - largest - 1                      # room for one more hop
    positions, states = [], []
    for layer in tqdm(range(L), desc="balanced placements", disable=not progress, leave=False):
        position = np.empty(E, dtype=np.int64)
        position[lines[layer]] = np.arange(E)
        found = balanced_states(counts[layer], P, *limits[layer], position)
        if not len(found):
            raise FoldingError(f"layer {layer} has no placement within its balance limits")
        positions.append(position)
        states.append(found)
    extra = [np.zeros(len(found), dtype=np.int64) for found in states]
    if unary is not None:
        extra = [unary(layer, states[layer], positions[layer]) for layer in
                 tqdm(range(L), desc="rest per placement", disable=not progress, leave=False)]
        if int(line_flows.sum()) * far_weight + sum(int(e.max()) for e in extra) >= infinity:
            dtype, infinity = np.uint32, np.iinfo(np.uint32).max - largest - 1
    check_memory(P ** E * np.dtype(dtype).itemsize)
    values = np.full(P ** E, infinity, dtype=dtype)
    values[states[0]] = extra[0]
    kept = [extra[0].astype(dtype)]
    with tqdm(total=(L - 1) * E, desc="chain dynamic program", disable=not progress, leave=False) as bar:
        for layer in range(L - 1):
            for line in range(E):
                flow = int(line_flows[layer, line])
                near, far = dtype(flow * near_weight), dtype(flow * far_weight)
                (transform or _transform_numpy)(values, P, P ** line, gpus_per_node, near, far)
                bar.update()
            kept.append(np.minimum(values[states[layer + 1]] + extra[layer + 1], infinity).astype(dtype))
            values.fill(infinity)
            values[states[layer + 1]] = kept[-1]
    del values
    # Back from the cheapest last state: at each layer the state that reaches the next one cheapest.
    path = [state_digits(states[-1][[int(np.argmin(kept[-1]))]], E, P)[0]]
    for layer in range(L - 2, -1, -1):
        digits = state_digits(states[layer], E, P)
        total = kept[layer].astype(np.int64) + (hops[digits, path[-1][None, :]] * line_flows[layer][None, :]).sum(axis=1)
        path.append(digits[int(np.argmin(total))])
    path.reverse()
    ranks = [path[layer][positions[layer]] for layer in range(L)]
    return ChainProgram(float(kept[-1].min()), ranks, states, positions, followers)


def inference_chain_bound(trace: RoutingTrace, ep_size: int, gpus_per_node: int,
                          balance_slack: float = DEFAULT_BALANCE_SLACK, sampling_noise: bool = False,
                          progress: bool = False, line_share: float = LINE_SHARE) -> ChainBound:
    """The bound of the module docstring, and the placement that attains it."""
    check_sizes(trace.num_experts, ep_size, gpus_per_node, 0)
    E, L, T, P = trace.num_experts, trace.num_layers, trace.num_tokens, ep_size
    if L < 2:
        raise FoldingError("the inference objective needs at least two MoE layers")
    if not 0.0 <= line_share <= 1.0:
        raise FoldingError(f"line share {line_share} must lie in [0, 1]")
    start = time.perf_counter()
    transitions = trace.top1_transitions()
    counts = trace.expert_counts().astype(np.float64)
    limits = [expert_balance_limits(trace, layer, counts[layer], P, E // P, balance_slack, sampling_noise)
              for layer in range(L)]
    hops = hop_costs(P, gpus_per_node)
    followers, _ = matching_lines(transitions)
    parts = line_parts(transitions, followers, line_share)
    rests = transitions.copy()
    for layer in range(L - 1):
        rests[layer, np.arange(E), followers[layer]] -= parts[layer]

    def rest_halves(layer: int, states: np.ndarray, positions: np.ndarray) -> np.ndarray:
        # Each pair's rest is at least half its bound from either side (rounded down).
        total = np.zeros(len(states), dtype=np.int64)
        if layer + 1 < L:
            total += rest_by_state(rests[layer], states, positions, P, hops, False) // 2
        if layer > 0:
            total += rest_by_state(rests[layer - 1], states, positions, P, hops, True) // 2
        return total

    program = chain_program(transitions, counts, limits, P, gpus_per_node, progress, unary=rest_halves,
                            line_share=line_share)
    placement = Placement.from_rank_assignment(E, P, gpus_per_node, [np.arange(E)] * L, program.ranks)
    scale = (L - 1) * T
    matching = sum(float(parts[l] @ hops[program.ranks[l], program.ranks[l + 1][followers[l]]])
                   for l in range(L - 1)) / scale
    bound = program.least / scale
    return ChainBound(bound, matching, bound - matching, placement, evaluate(placement, trace).cost("inference"),
                      time.perf_counter() - start)
