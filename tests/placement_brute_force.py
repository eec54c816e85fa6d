"""Brute force for the placement tests: every balanced placement of every layer of a small
instance (8 experts x 4 layers x 4 ranks in 2 nodes), chained by dynamic programming."""

import itertools

import numpy as np

from folding.placement.packing import balanced_packing

E, L, P, G, PER_RANK = 8, 4, 4, 2, 2


def noise_free_limits(loads, slack):
    rank_loads = np.sort(np.bincount(balanced_packing(loads, P, PER_RANK), weights=loads, minlength=P))
    return rank_loads[-2], rank_loads[-1] * (1 + slack) - rank_loads[-2]


NODES = np.arange(P) // G
HOPS = (np.arange(P)[:, None] != np.arange(P)[None, :]).astype(int) + (NODES[:, None] != NODES[None, :])
EVERY = np.array([r for r in itertools.product(range(P), repeat=E) if all(r.count(k) == PER_RANK for k in range(P))])


def feasible_placements(trace, slack):
    counts = trace.expert_counts().astype(float)
    out = []
    for layer in range(L):
        threshold, budget = noise_free_limits(counts[layer], slack)
        loads = np.stack([np.bincount(r, weights=counts[layer], minlength=P) for r in EVERY])
        out.append(EVERY[np.maximum(loads - threshold, 0).sum(axis=1) <= budget + 1e-9])
    return out


def pair_costs(flow, first, second):
    """cost[a, b] = sum_ij flow[i, j] hops[first[a]_i, second[b]_j]."""
    into = np.einsum("ij,rs,bjs->bir", flow, HOPS.astype(float), np.eye(P)[second])
    return np.eye(P)[first].reshape(len(first), E * P) @ into.reshape(len(second), -1).T


def chain_minimum(feasible, flows, unary=None):
    """Least sum over layer pairs of pair_costs (plus unary[l] per placement of layer l) over
    every sequence of balanced placements, by dynamic programming."""
    unary = unary or [np.zeros(len(f)) for f in feasible]
    best = unary[0].astype(float)
    for layer in range(L - 1):
        best = (best[:, None] + pair_costs(flows[layer], feasible[layer], feasible[layer + 1])).min(axis=0)
        best = best + unary[layer + 1]
    return best.min()
