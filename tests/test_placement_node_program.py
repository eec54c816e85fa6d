"""The node-split program against brute force: with every node placement kept it is the exact
optimum over every sequence of balanced placements; it keeps the fast solver's balance rule."""

import numpy as np
import pytest

from folding.placement import node_program
from folding.placement.node_program import node_split_program
from folding.placement.problem import DEFAULT_BALANCE_SLACK, build_items
from folding.placement.search import LayerSearch
from folding.placement.synth import SynthSpec, synthesize

from placement_brute_force import E, EVERY, G, HOPS, L, P, chain_minimum, feasible_placements, noise_free_limits

RANK_NODES = np.arange(P) // G


@pytest.fixture(scope="module")
def trace():
    return synthesize(SynthSpec(E, L, 800, 2, coactivation=0.6, affinity=0.7, skew=0.5, group_size=2, seed=7,
                                token_seed=7))


def cost_of(ranks, flows):
    return sum(float(np.sum(flows[l] * HOPS[ranks[l]][:, ranks[l + 1]])) for l in range(L - 1))


def run(trace, limits, keep, noise=False, affinities=None, hops=HOPS):
    counts = trace.expert_counts().astype(float)
    return node_split_program(trace.top1_transitions(), list(counts), affinities or [None] * L, limits,
                              hops.astype(float), G, noise, keep=keep)


def test_with_every_node_placement_kept_it_is_the_brute_force_optimum(trace):
    counts = trace.expert_counts().astype(float)
    limits = [noise_free_limits(counts[layer], 0.01) for layer in range(L)]
    flows = trace.top1_transitions()
    optimum = chain_minimum(feasible_placements(trace, 0.01), flows)
    ranks = run(trace, limits, keep=10_000)
    assert cost_of(ranks, flows) == pytest.approx(optimum, abs=1e-9)
    for layer, layer_ranks in enumerate(ranks):
        assert np.bincount(layer_ranks, minlength=P).tolist() == [E // P] * P
        threshold, budget = limits[layer]
        loads = np.bincount(layer_ranks, weights=counts[layer], minlength=P)
        assert np.maximum(loads - threshold, 0).sum() <= budget + 1e-9
    # keeping fewer node placements can only cost more; a hop matrix without the node hop
    # (a wrong cost) misses the optimum, so the comparison above can fail
    assert cost_of(run(trace, limits, keep=1), flows) >= optimum - 1e-9
    wrong = run(trace, limits, keep=10_000, hops=(HOPS > 0).astype(int))
    assert cost_of(wrong, flows) > optimum + 1e-9


def test_it_keeps_the_solver_balance_rule_with_sampling_noise(trace):
    layers = build_items(trace, P, 0, DEFAULT_BALANCE_SLACK, noise=True)
    assert all(np.array_equal(i.experts, np.arange(E)) for i in layers)
    ranks = run(trace, [(i.threshold, i.excess_budget) for i in layers], keep=8, noise=True,
                affinities=[i.affinity() for i in layers])
    for items, layer_ranks in zip(layers, ranks):
        search = LayerSearch(layer_ranks, items.loads, RANK_NODES, items.threshold, items.excess_budget,
                             items.affinity(), noise=True)
        assert search.within_budget()


def test_no_placement_within_the_limits_gives_none(trace):
    counts = trace.expert_counts().astype(float)
    limits = [noise_free_limits(counts[layer], 0.01) for layer in range(L)]
    limits[2] = (0.0, 0.0)
    assert run(trace, limits, keep=4) is None


def test_applicable_sizes():
    assert node_program.sizes(16, 4, 2) == (12_870, 4_900)
    assert node_program.applicable(16, 4, 2) and node_program.applicable(8, 4, 2)
    assert not node_program.applicable(16, 4, 4)   # one node: nothing to split first
    assert not node_program.applicable(32, 4, 2)   # C(32, 16) node placements
    assert not node_program.applicable(16, 8, 2)   # 16! / 4!^4 node placements
    assert 4 < node_program.estimated_seconds(16, 4, 2, 8) < 16
