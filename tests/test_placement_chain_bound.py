"""The chain bound on the inference objective, against brute force: every balanced placement of
every layer chained by dynamic programming, on instances small enough to enumerate."""

import itertools

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from folding.errors import FoldingError
from folding.placement import chain_bound
from folding.placement.chain_bound import _transform_numpy, chain_program, hop_costs, inference_chain_bound
from folding.placement.packing import balanced_packing
from folding.placement.synth import SynthSpec, synthesize

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


@pytest.fixture(scope="module")
def trace():
    return synthesize(SynthSpec(E, L, 800, 2, affinity=0.7, skew=0.5, group_size=2, seed=5, token_seed=5))


def split_flows(trace):
    """Each layer pair's flows on its maximum-weight matching, and the rest."""
    matched, rest = [], []
    for flow in trace.top1_transitions():
        rows, cols = linear_sum_assignment(-flow)
        on = np.zeros_like(flow)
        on[rows, cols] = flow[rows, cols]
        matched.append(on)
        rest.append(flow - on)
    return matched, rest


def test_chain_bound_against_brute_force(trace):
    scale = (L - 1) * trace.num_tokens
    feasible = feasible_placements(trace, 0.01)
    optimum = chain_minimum(feasible, trace.top1_transitions()) / scale
    matched, rest = split_flows(trace)
    # each pair's rest from either side, the other layer free (PER_RANK experts per rank, unbalanced)
    unary = [np.zeros(len(f)) for f in feasible]
    for layer in range(L - 1):
        unary[layer] += pair_costs(rest[layer], feasible[layer], EVERY).min(axis=1) // 2
        unary[layer + 1] += pair_costs(rest[layer], EVERY, feasible[layer + 1]).min(axis=0) // 2
    expected = chain_minimum(feasible, matched, unary) / scale
    result = inference_chain_bound(trace, P, G, balance_slack=0.01)
    assert result.bound == pytest.approx(expected, abs=1e-12)
    assert result.bound <= optimum + 1e-12 <= result.placement_cost + 2e-12
    assert result.bound == pytest.approx(result.matching + result.rest)
    # the rest is worth charging: the matching part alone is far lower
    matching_minimum = chain_minimum(feasible, matched) / scale
    assert result.bound > 1.5 * matching_minimum
    # and the program alone reaches the matching part's exact minimum
    counts = trace.expert_counts().astype(float)
    limits = [noise_free_limits(counts[layer], 0.01) for layer in range(L)]
    program = chain_program(trace.top1_transitions(), counts, limits, P, G)
    assert program.least / scale == pytest.approx(matching_minimum, abs=1e-12)


def test_transform_is_the_min_plus_pass_with_hop_costs():
    rng = np.random.default_rng(0)
    hops = hop_costs(P, G)
    for digit in range(4):
        values = rng.integers(0, 50, size=P ** 4).astype(np.uint16)
        expected = values.reshape(-1, P, P ** digit).astype(np.int64)
        expected = (expected[:, None, :, :] + 3 * hops[None, :, :, None]).min(axis=2).ravel()
        _transform_numpy(values, P, P ** digit, G, np.uint16(3), np.uint16(6))
        assert values.tolist() == expected.tolist()
        # a wrong far cost is caught
        wrong = rng.integers(0, 50, size=P ** 4).astype(np.uint16)
        reference = (wrong.reshape(-1, P, P ** digit).astype(np.int64)[:, None] + 3 * hops[None, :, :, None]).min(axis=2)
        _transform_numpy(wrong, P, P ** digit, G, np.uint16(3), np.uint16(3))
        assert wrong.tolist() != reference.ravel().tolist()


def test_numba_transform_matches_numpy():
    if chain_bound._numba_transform(4, 2) is None:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(1)
    for base, group, digits in ((4, 2, 7), (3, 3, 6), (4, 1, 5), (5, 2, 5)):
        transform = chain_bound._numba_transform(base, group)
        for digit in range(digits):
            values = rng.integers(0, 1000, size=base ** digits).astype(np.uint16)
            other = values.copy()
            transform(values, base, base ** digit, group, np.uint16(7), np.uint16(15))
            _transform_numpy(other, base, base ** digit, group, np.uint16(7), np.uint16(15))
            assert np.array_equal(values, other)


def test_chain_bound_refuses_what_it_cannot_do(trace, monkeypatch):
    with pytest.raises(FoldingError, match="at least two MoE layers"):
        inference_chain_bound(synthesize(SynthSpec(8, 1, 100, 2)), 4, 2)
    monkeypatch.setattr(chain_bound, "_numba_transform", lambda base, group: None)
    with pytest.raises(FoldingError, match=r"4\^16 states .*install numba"):
        inference_chain_bound(synthesize(SynthSpec(16, 2, 100, 2)), 4, 2)
    with pytest.raises(FoldingError, match="does not divide"):
        inference_chain_bound(trace, 3, 1)
    # 4^8 states of 2 bytes do not fit in 100 kB
    monkeypatch.setattr(chain_bound, "available_memory", lambda: 100_000)
    with pytest.raises(FoldingError, match=r"needs 0 MiB for its states and 0 MiB are available"):
        inference_chain_bound(trace, P, G)
