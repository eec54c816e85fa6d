"""A two-level dynamic program over layers that places small multi-node inference instances: the
fast solver's node-split start (``starts.NodeSplitStart``).

Block coordinate descent moves one layer at a time, so a token path that should move to another
rank in every layer at once stays where it is; a dynamic program over layers moves them all.
Its states are whole placements of a layer, too many at the rank level (16 experts on 4 ranks:
63 million per layer), so it runs twice:

1. over node placements (which experts share each node; 12,870 for 16 experts on 2 nodes) that
   can be split into ranks within the balance limits, with a hop between nodes costing the
   largest hop and none inside a node, forward and backward: each layer keeps the ``keep``
   node placements of least total cost through it;
2. over every split of those node placements into ranks within the balance limits, with the
   exact hop costs: its cheapest sequence is the start.

Balance is the fast solver's rule (``search.expected_excess``), exactly, at both levels.
"""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np

from folding.placement.problem import ordered_partitions
from folding.placement.search import expected_excess

MAX_NODE_STATES = 20_000
"""Most node placements per layer (the first program's pass is quadratic in them)."""
MAX_RANK_STATES = 200_000
"""Most rank placements per layer the second program may meet: ``keep`` x rank splits per node
placement (its pass is quadratic in them, by blocks)."""
KEEP = 16
"""Node placements kept per layer. Measured on 16 experts x 8 layers x 4 ranks (2 per node):
1 gives 1.381 (the node labels of its layers disagree), 16 gives 0.488 in 6 s, 64 the same in 23 s."""


def sizes(num_experts: int, ep_size: int, gpus_per_node: int) -> tuple:
    """(node placements, rank splits per node placement) of the program."""
    nodes = ep_size // gpus_per_node
    per_node, per_rank = num_experts // nodes, num_experts // ep_size
    node_states = math.factorial(num_experts) // math.factorial(per_node) ** nodes
    splits = (math.factorial(per_node) // math.factorial(per_rank) ** gpus_per_node) ** nodes
    return node_states, splits


def applicable(num_experts: int, ep_size: int, gpus_per_node: int, keep: int = KEEP) -> bool:
    """Several nodes of whole ranks, few enough placements at both levels."""
    if ep_size % gpus_per_node or ep_size == gpus_per_node or num_experts % ep_size:
        return False
    node_states, splits = sizes(num_experts, ep_size, gpus_per_node)
    return node_states <= MAX_NODE_STATES and keep * splits <= MAX_RANK_STATES


def estimated_seconds(num_experts: int, ep_size: int, gpus_per_node: int, num_layers: int,
                      keep: int = KEEP) -> float:
    """0.1 ns per multiply-add of the passes, where balance keeps about 1 in 20 rank splits
    (measured on 16 experts x 8 layers x 4 ranks in 2 nodes: 4% kept, 7 to 10 s in all, this
    estimate 8 s)."""
    node_states, splits = sizes(num_experts, ep_size, gpus_per_node)
    nodes = ep_size // gpus_per_node
    rank_states = keep * splits / 20
    return 1e-10 * (num_layers - 1) * (2 * node_states ** 2 * num_experts * nodes
                                       + rank_states ** 2 * num_experts * ep_size)


def _group_excess(members: np.ndarray, loads: np.ndarray, affinity: Optional[np.ndarray], threshold: float,
                  noise: bool) -> np.ndarray:
    """Balance excess of each group of items (``members`` [..., S]) sharing one rank."""
    load = loads[members].sum(axis=-1)
    if affinity is None:
        inner = np.zeros_like(load)
    else:
        inner = 0.5 * affinity[members[..., :, None], members[..., None, :]].sum(axis=(-1, -2))
    return expected_excess(load, inner, threshold, noise)


def _pair_kernel(flow: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """[E*H, E*H]: flow[i, j] * costs[a, b] at (i*H + a, j*H + b), so that one-hot placements
    x and y over H hosts give the pair's cost as x @ kernel @ y."""
    E, H = flow.shape[0], costs.shape[0]
    return np.einsum("ij,ab->iajb", flow, costs).reshape(E * H, E * H)


def _least_pass(values: np.ndarray, first: np.ndarray, flow: np.ndarray, second: np.ndarray):
    """(least, argleast) over states a of values[a] + first[a] @ flow @ second[b].T, for every b,
    by blocks of rows."""
    right = second @ flow.T
    least = np.full(len(second), np.inf)
    arg = np.zeros(len(second), dtype=np.int64)
    for start in range(0, len(first), 1024):
        total = values[start:start + 1024, None] + first[start:start + 1024] @ right.T
        block_arg = total.argmin(axis=0)
        block_least = total[block_arg, np.arange(len(second))]
        better = block_least < least
        least[better], arg[better] = block_least[better], block_arg[better] + start
    return least, arg


def _cheapest_sequence(one_hot: List[np.ndarray], kernels: List[np.ndarray]) -> tuple:
    """(least total, state index per layer) of sum_l one_hot[l][s_l] @ kernels[l] @ one_hot[l+1][s_{l+1}]."""
    values, back = np.zeros(len(one_hot[0])), []
    for layer, kernel in enumerate(kernels):
        values, arg = _least_pass(values, one_hot[layer], kernel, one_hot[layer + 1])
        back.append(arg)
    path = [int(np.argmin(values))]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return float(values.min()), path[::-1]


def node_split_program(transitions: np.ndarray, loads: List[np.ndarray], affinities: List[Optional[np.ndarray]],
                       limits: List[tuple], hops: np.ndarray, gpus_per_node: int, noise: bool,
                       keep: int = KEEP) -> Optional[List[np.ndarray]]:
    """The rank of every item per layer (module docstring), or None when some layer has no
    placement within its limits. ``transitions`` [L-1, E, E] are top-1 flows between the items
    of consecutive layers (one item per expert), ``loads`` and ``affinities`` per layer,
    ``limits`` each layer's (threshold, excess budget), ``hops`` [P, P] the hop costs."""
    L, E = len(loads), len(loads[0])
    P = hops.shape[0]
    N, G = P // gpus_per_node, gpus_per_node
    per_node, per_rank = E // N, E // P
    nodes = ordered_partitions(E, N, per_node)                 # [M, N, E/N] items of each node
    splits = ordered_partitions(per_node, G, per_rank)         # [K, G, S] positions in a node
    node_of = np.empty((len(nodes), E), dtype=np.int64)
    for n in range(N):
        node_of[np.arange(len(nodes))[:, None], nodes[:, n]] = n

    # each layer's excess budget, up to rounding
    budgets = [budget + 1e-9 * max(1.0, float(layer_loads.sum())) for (_, budget), layer_loads in zip(limits, loads)]
    feasible, best_splits = [], []
    for layer in range(L):
        # excess[m, n, k]: node n of node placement m split the k-th way
        members = nodes[:, :, splits]                               # [M, N, K, G, S]
        excess = _group_excess(members, loads[layer], affinities[layer], limits[layer][0], noise).sum(axis=-1)
        within = excess.min(axis=2).sum(axis=1) <= budgets[layer]
        feasible.append(np.flatnonzero(within))
        best_splits.append(excess)
        if not len(feasible[-1]):
            return None

    far = float(hops.max())
    node_hot = [np.eye(N)[node_of[f]].reshape(len(f), E * N) for f in feasible]
    node_kernels = [_pair_kernel(flow, far * (1.0 - np.eye(N))) for flow in transitions]
    forward = [np.zeros(len(feasible[0]))]
    for layer in range(L - 1):
        forward.append(_least_pass(forward[-1], node_hot[layer], node_kernels[layer], node_hot[layer + 1])[0])
    backward = [np.zeros(len(feasible[-1]))]
    for layer in range(L - 2, -1, -1):
        backward.append(_least_pass(backward[-1], node_hot[layer + 1], node_kernels[layer].T, node_hot[layer])[0])
    backward.reverse()

    def within_limits(layer: int, m: int) -> np.ndarray:
        """[C, E]: every split of node placement m into ranks within the layer's limits."""
        total = np.zeros([len(splits)] * N)
        for n in range(N):
            total = total + best_splits[layer][m, n].reshape([-1 if axis == n else 1 for axis in range(N)])
        combos = np.argwhere(total <= budgets[layer])               # [C, N]
        ranks = np.empty((len(combos), E), dtype=np.int64)
        for n in range(N):
            items = nodes[m, n][splits[combos[:, n]]].reshape(len(combos), G * per_rank)
            np.put_along_axis(ranks, items, np.repeat(n * G + np.arange(G), per_rank)[None, :], axis=1)
        return ranks

    kernels = [_pair_kernel(flow, hops) for flow in transitions]
    rank_states = []
    for layer in range(L):
        kept = feasible[layer][np.argsort(forward[layer] + backward[layer], kind="stable")[:keep]]
        rank_states.append(np.concatenate([within_limits(layer, m) for m in kept]))
    _, path = _cheapest_sequence([np.eye(P)[s].reshape(len(s), E * P) for s in rank_states], kernels)
    return [rank_states[layer][path[layer]] for layer in range(L)]
