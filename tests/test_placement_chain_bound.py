"""The chain bound on the inference objective, against brute force: every balanced placement of
every layer chained by dynamic programming, on instances small enough to enumerate."""

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from folding.errors import FoldingError
from folding.placement import chain_bound
from folding.placement.chain_bound import _transform_numpy, chain_program, hop_costs, inference_chain_bound
from folding.placement.synth import SynthSpec, synthesize

from placement_brute_force import E, EVERY, G, L, P, chain_minimum, feasible_placements, noise_free_limits, pair_costs


@pytest.fixture(scope="module")
def trace():
    return synthesize(SynthSpec(E, L, 800, 2, affinity=0.7, skew=0.5, group_size=2, seed=5, token_seed=5))


def split_flows(trace, share=1.0):
    """Each layer pair's flows on its maximum-weight matching (``share`` of them, rounded
    down), and the rest."""
    matched, rest = [], []
    for flow in trace.top1_transitions():
        rows, cols = linear_sum_assignment(-flow)
        on = np.zeros_like(flow)
        on[rows, cols] = np.floor(share * flow[rows, cols])
        matched.append(on)
        rest.append(flow - on)
    return matched, rest


def brute_force_bound(trace, feasible, share):
    matched, rest = split_flows(trace, share)
    # each pair's rest from either side, the other layer free (PER_RANK experts per rank, unbalanced)
    unary = [np.zeros(len(f)) for f in feasible]
    for layer in range(L - 1):
        unary[layer] += pair_costs(rest[layer], feasible[layer], EVERY).min(axis=1) // 2
        unary[layer + 1] += pair_costs(rest[layer], EVERY, feasible[layer + 1]).min(axis=0) // 2
    return chain_minimum(feasible, matched, unary) / ((L - 1) * trace.num_tokens)


@pytest.mark.parametrize("share", [1.0, 0.9, 0.5])
def test_chain_bound_against_brute_force(trace, share):
    scale = (L - 1) * trace.num_tokens
    feasible = feasible_placements(trace, 0.01)
    optimum = chain_minimum(feasible, trace.top1_transitions()) / scale
    expected = brute_force_bound(trace, feasible, share)
    result = inference_chain_bound(trace, P, G, balance_slack=0.01, line_share=share)
    assert result.bound == pytest.approx(expected, abs=1e-12)
    assert result.bound <= optimum + 1e-12 <= result.placement_cost + 2e-12
    assert result.bound == pytest.approx(result.matching + result.rest)
    if share == 1.0:
        return
    # a wrong split (the program charging the matched flow in full while the assignments also
    # see part of it) would count that part twice and is caught
    assert brute_force_bound(trace, feasible, 1.0) != pytest.approx(expected, abs=1e-9)


def test_a_share_of_the_matched_flow_in_the_assignments_lifts_the_bound(trace):
    feasible = feasible_placements(trace, 0.01)
    scale = (L - 1) * trace.num_tokens
    optimum = chain_minimum(feasible, trace.top1_transitions()) / scale
    full = inference_chain_bound(trace, P, G, balance_slack=0.01, line_share=1.0).bound
    shared = inference_chain_bound(trace, P, G, balance_slack=0.01).bound
    assert full < shared <= optimum + 1e-12
    with pytest.raises(FoldingError, match="line share 1.5 must lie in"):
        inference_chain_bound(trace, P, G, line_share=1.5)


def test_program_alone_reaches_the_matching_minimum(trace):
    scale = (L - 1) * trace.num_tokens
    feasible = feasible_placements(trace, 0.01)
    result = inference_chain_bound(trace, P, G, balance_slack=0.01, line_share=1.0)
    matched, _ = split_flows(trace)
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
