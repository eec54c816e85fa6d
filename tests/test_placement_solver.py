"""Packing, the swap search, the solver, the baselines and the MILP, checked against hand-computed
values and brute-force optima on instances small enough to enumerate."""

import itertools

import numpy as np
import pytest
from scipy import integrate, stats

from folding.errors import FoldingError
from folding.placement.baselines import contiguous, eplb, exflow
from folding.placement.metrics import evaluate
from folding.placement.milp import solve_milp
from folding.placement.packing import balanced_packing, replica_counts
from folding.placement.placement import Placement
from folding.placement.search import LayerSearch, balance_bound, best_first, expected_excess
from folding.placement.solver import solve
from folding.placement.starts import (DEFAULT_STARTS, ChainStart, NodeFirstStart, NodeSplitStart,
                                      PackingStart)
from folding.placement.synth import SynthSpec, synthesize
from folding.placement.trace import RoutingTrace
from folding.placement.training import align_ranks


# ----------------------------------------------------------------------------- packing
def test_replica_counts_follow_the_largest_load_per_replica():
    # 10,4,3: 10 -> 5 (two copies), 5 -> 3.33 (three), then 4 beats 3.33 and 3
    assert replica_counts(np.array([10.0, 4.0, 3.0]), 3).tolist() == [3, 2, 1]
    assert replica_counts(np.array([1.0, 2.0]), 0).tolist() == [1, 1]


def test_balanced_packing_by_hand():
    loads = np.array([5.0, 4.0, 3.0, 3.0, 2.0, 1.0])
    bins = balanced_packing(loads, 2, 3)
    # 5->a, 4->b, 3->b, 3->a, 2->b (b now full), 1->a: both bins carry 9
    assert np.bincount(bins).tolist() == [3, 3]
    assert np.bincount(bins, weights=loads).tolist() == [9.0, 9.0]
    with pytest.raises(FoldingError, match="do not fill"):
        balanced_packing(loads, 4, 2)


# ----------------------------------------------------------------------------- search
def reference_cost(ranks, nodes, linear, affinity, rank_weight, node_weight):
    """Cost from scratch: linear terms minus weighted affinity of pairs sharing a rank / node."""
    total = sum(linear[v, r] for v, r in enumerate(ranks))
    for v, u in itertools.combinations(range(len(ranks)), 2):
        if ranks[v] == ranks[u]:
            total -= rank_weight * affinity[v, u]
        if nodes[ranks[v]] == nodes[ranks[u]]:
            total -= node_weight * affinity[v, u]
    return total


def reference_excess(ranks, loads, affinity, threshold, num_ranks):
    total = 0.0
    for r in range(num_ranks):
        members = [v for v in range(len(ranks)) if ranks[v] == r]
        load = sum(loads[v] for v in members)
        inner = sum(affinity[v, u] for v, u in itertools.combinations(members, 2))
        sd = np.sqrt(2 * (load + 2 * inner))
        total += integrate.quad(lambda x: (x - threshold) * stats.norm.pdf(x, load, sd), threshold, load + 12 * sd)[0]
    return total


def small_search(seed, linear=True):
    rng = np.random.default_rng(seed)
    V, P = 8, 4
    affinity = rng.integers(0, 20, (V, V)).astype(float)
    affinity = np.triu(affinity, 1) + np.triu(affinity, 1).T
    loads = rng.integers(10, 60, V).astype(float)
    ranks = np.repeat(np.arange(P), 2)[rng.permutation(V)]
    cost = rng.random((V, P)) * 30 if linear else None
    return LayerSearch(ranks, loads, np.array([0, 0, 1, 1]), threshold=150.0, excess_budget=1e9,
                       affinity=affinity, rank_weight=1.0, node_weight=4.0, linear=cost), affinity, loads, cost


@pytest.mark.parametrize("seed", [0, 1])
def test_swap_gains_and_excess_changes_match_recomputation(seed):
    search, affinity, loads, linear = small_search(seed)
    nodes = search.rank_nodes
    gains, changes = search.gains(), search.excess_change()
    before = reference_cost(search.rank, nodes, linear, affinity, 1.0, 4.0)
    excess = reference_excess(search.rank, loads, affinity, 150.0, 4)
    assert search.cost() == pytest.approx(before)
    assert search.excess() == pytest.approx(excess, rel=1e-6)
    for v, u in itertools.combinations(range(8), 2):
        ranks = search.rank.copy()
        if ranks[v] == ranks[u]:
            assert gains[v, u] == -np.inf
            continue
        ranks[v], ranks[u] = ranks[u], ranks[v]
        assert gains[v, u] == pytest.approx(before - reference_cost(ranks, nodes, linear, affinity, 1.0, 4.0))
        assert changes[v, u] == pytest.approx(reference_excess(ranks, loads, affinity, 150.0, 4) - excess,
                                              rel=1e-6, abs=1e-6)


def test_swaps_keep_the_incremental_state_exact():
    search, affinity, loads, linear = small_search(3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        v, u = rng.choice(8, 2, replace=False)
        if search.rank[v] != search.rank[u]:
            search.swap(v, u)
    fresh = LayerSearch(search.rank, loads, search.rank_nodes, 150.0, 1e9, affinity, 1.0, 4.0, linear)
    assert np.allclose(search.rank_affinity, fresh.rank_affinity)
    assert np.allclose(search.node_affinity, fresh.node_affinity)
    assert np.allclose(search.rank_inner, fresh.rank_inner)
    assert np.array_equal(search.rank_affinity_t, search.rank_affinity.T)  # the copy gains() reads
    assert search.cost() == pytest.approx(fresh.cost())


def test_best_first_orders_like_a_stable_sort():
    rng = np.random.default_rng(5)
    for size, count in ((10, 20), (1000, 7), (5000, 300)):
        values = rng.integers(0, 50, size).astype(float)  # many ties, also at the cut
        assert np.array_equal(best_first(values, count), np.argsort(-values, kind="stable")[:count])


def test_improve_reaches_a_swap_local_optimum_and_respects_the_budget():
    search, affinity, loads, linear = small_search(4)
    search.excess_budget = search.excess() + 1.0
    start = search.cost()
    search.improve()
    assert search.cost() <= start
    assert search.excess() <= search.excess_budget + 1e-6
    gains = search.gains()
    feasible = search.excess() + search.excess_change() <= search.excess_budget + 1e-6
    assert not np.any((gains > 1e-6) & feasible)


def test_repair_brings_the_excess_within_budget():
    loads = np.array([50.0, 50.0, 1.0, 1.0, 1.0, 1.0])
    ranks = np.array([0, 0, 1, 1, 2, 2])  # rank 0 carries 100, the others 2
    search = LayerSearch(ranks, loads, np.zeros(3, dtype=int), threshold=60.0, excess_budget=1.0, noise=False)
    assert search.excess() == pytest.approx(40.0)
    assert search.repair()
    assert np.bincount(search.rank, weights=loads, minlength=3).max() <= 61.0


def test_expected_excess_matches_integration():
    for load, inner, threshold in [(100.0, 0.0, 110.0), (100.0, 30.0, 95.0), (400.0, 100.0, 450.0)]:
        sd = np.sqrt(2 * (load + 2 * inner))
        truth = integrate.quad(lambda x: (x - threshold) * stats.norm.pdf(x, load, sd), threshold, load + 12 * sd)[0]
        assert expected_excess(np.array(load), np.array(inner), threshold) == pytest.approx(truth, rel=1e-6)
    assert expected_excess(np.array([5.0, 1.0]), 0.0, 2.0, noise=False).tolist() == [3.0, 0.0]


def test_balance_bound_is_the_tightest_threshold():
    ranks = np.repeat(np.arange(5), 2)
    loads = np.array([90, 20, 60, 40, 55, 50, 70, 30, 35, 45], dtype=float)
    threshold, bound = balance_bound(ranks, loads, 5, None)
    rank_loads = np.bincount(ranks, weights=loads)
    sd = np.sqrt(2 * rank_loads)
    assert stats.norm.sf(threshold, rank_loads, sd).sum() == pytest.approx(1.0, abs=1e-6)
    for t in np.linspace(threshold - 20, threshold + 20, 41):
        assert t + expected_excess(rank_loads, 0.0, t).sum() >= bound - 1e-9
    # the bound holds: expected peak of independent normals by simulation
    draws = np.random.default_rng(0).normal(rank_loads, sd, (200_000, 5)).max(axis=1).mean()
    assert draws <= bound
    assert balance_bound(ranks, loads, 5, None, noise=False) == (105.0, 110.0)  # second and first


# ----------------------------------------------------------------------------- brute force optima
def training_trace(seed):
    return synthesize(SynthSpec(8, 1, 300, 3, coactivation=0.8, group_size=4, seed=seed, token_seed=seed))


def all_balanced_assignments(num_items, num_ranks, per_rank):
    """Every assignment of items to ranks with ``per_rank`` items each, item 0 on rank 0."""
    for ranks in itertools.product(range(num_ranks), repeat=num_items):
        if ranks[0] == 0 and all(ranks.count(r) == per_rank for r in range(num_ranks)):
            yield np.array(ranks)


def noise_free_limits(loads, ep_size, per_rank, slack):
    """Threshold and budget of the noise-free balance rule, from greedy packing's loads."""
    rank_loads = np.sort(np.bincount(balanced_packing(loads, ep_size, per_rank), weights=loads, minlength=ep_size))
    return rank_loads[-2], rank_loads[-1] * (1 + slack) - rank_loads[-2]


@pytest.mark.parametrize("seed", [0, 1])
def test_training_solver_and_milp_reach_the_brute_force_optimum(seed):
    trace = training_trace(seed)
    counts = trace.expert_counts()[0].astype(float)
    threshold, budget = noise_free_limits(counts, 4, 2, 0.01)
    best = np.inf
    for ranks in all_balanced_assignments(8, 4, 2):
        loads = np.bincount(ranks, weights=counts, minlength=4)
        if np.maximum(loads - threshold, 0).sum() > budget + 1e-9:
            continue
        placement = Placement.from_rank_assignment(8, 4, 2, [np.arange(8)], [ranks])
        best = min(best, evaluate(placement, trace).cost("training"))
    heuristic = solve(trace, 4, 2, "training", balance_slack=0.01, sampling_noise=False)
    exact = solve_milp(trace, 4, 2, "training", balance_slack=0.01, time_limit=60)
    assert exact.optimal and exact.cost == pytest.approx(best) and exact.bound == pytest.approx(best, rel=1e-6)
    assert evaluate(heuristic.placement, trace).cost("training") == pytest.approx(best)


def inference_trace(seed):
    return synthesize(SynthSpec(6, 2, 300, 2, affinity=0.8, skew=0.3, group_size=2, seed=seed, token_seed=seed))


@pytest.mark.parametrize("seed", [0, 1])
def test_inference_solver_and_milp_reach_the_brute_force_optimum(seed):
    trace = inference_trace(seed)
    counts = trace.expert_counts().astype(float)
    transitions = trace.top1_transitions()[0]
    feasible = []
    for layer in range(2):
        threshold, budget = noise_free_limits(counts[layer], 3, 2, 0.01)
        options = []
        for ranks in itertools.product(range(3), repeat=6):
            ranks = np.array(ranks)
            if np.bincount(ranks, minlength=3).tolist() != [2, 2, 2]:
                continue
            loads = np.bincount(ranks, weights=counts[layer], minlength=3)
            if np.maximum(loads - threshold, 0).sum() <= budget + 1e-9:
                options.append(ranks)
        feasible.append(options)
    best = min(np.sum(transitions * (a[:, None] != b[None, :])) for a in feasible[0] for b in feasible[1])
    best /= trace.num_tokens
    heuristic = solve(trace, 3, 3, "inference", balance_slack=0.01, sampling_noise=False)
    exact = solve_milp(trace, 3, 3, "inference", balance_slack=0.01, time_limit=60)
    assert exact.optimal and exact.cost == pytest.approx(best) and exact.bound == pytest.approx(best, abs=1e-6)
    assert evaluate(heuristic.placement, trace).cost("inference") == pytest.approx(best)


def test_inference_milp_reaches_the_brute_force_optimum_across_nodes_and_layers():
    """8 experts, 3 layers, 4 ranks in 2 nodes: every balanced placement of every layer, chained
    by dynamic programming over the layers, with hops costing 1 inside a node and 2 across."""
    E, L, P, per_rank = 8, 3, 4, 2
    trace = synthesize(SynthSpec(E, L, 600, 2, affinity=0.7, skew=0.4, group_size=2, seed=3, token_seed=3))
    counts = trace.expert_counts().astype(float)
    transitions = trace.top1_transitions()
    nodes = np.arange(P) // 2
    hops = (np.arange(P)[:, None] != np.arange(P)[None, :]) + (nodes[:, None] != nodes[None, :]).astype(float)
    every = np.array([r for r in itertools.product(range(P), repeat=E)
                      if all(r.count(k) == per_rank for k in range(P))])
    feasible = []
    for layer in range(L):
        threshold, budget = noise_free_limits(counts[layer], P, per_rank, 0.01)
        loads = np.stack([np.bincount(r, weights=counts[layer], minlength=P) for r in every])
        feasible.append(every[np.maximum(loads - threshold, 0).sum(axis=1) <= budget + 1e-9])
    one_hot = [np.eye(P)[f].reshape(len(f), E * P) for f in feasible]
    best = np.zeros(len(feasible[0]))
    for layer in range(L - 1):
        # cost[a, b] = sum_ij flow[i, j] hops[a_i, b_j]
        into = np.einsum("ij,rs,bjs->bir", transitions[layer], hops, np.eye(P)[feasible[layer + 1]])
        cost = one_hot[layer] @ into.reshape(len(feasible[layer + 1]), E * P).T
        best = (best[:, None] + cost).min(axis=0)
    best = best.min() / ((L - 1) * trace.num_tokens)
    exact = solve_milp(trace, P, 2, "inference", balance_slack=0.01, time_limit=60)
    assert exact.optimal and exact.cost == pytest.approx(best) and exact.bound == pytest.approx(best, abs=1e-6)
    heuristic = solve(trace, P, 2, "inference", balance_slack=0.01, sampling_noise=False)
    assert evaluate(heuristic.placement, trace).cost("inference") >= best - 1e-12


def test_inference_milp_out_of_time_keeps_its_proven_bound(monkeypatch):
    from types import SimpleNamespace

    from folding.placement import milp

    trace = inference_trace(0)
    # HiGHS at its time limit without a placement: only the bound of its search comes back.
    exact = solve_milp(trace, 3, 3, "inference", balance_slack=0.01, time_limit=60)
    solve = milp._Model.solve
    monkeypatch.setattr(milp._Model, "solve", lambda self, limit, relax=False: SimpleNamespace(
        x=None, mip_dual_bound=-0.5, status=1))
    timed_out = solve_milp(trace, 3, 3, "inference", balance_slack=0.01, time_limit=60)
    assert timed_out.placement is None and np.isnan(timed_out.cost) and not timed_out.optimal
    # the bound is the search's plus the constant: every transition times the rank weight (one node)
    assert timed_out.bound == pytest.approx(-0.5 + 1.0)
    # Without a bound from the search, the LP relaxation's: below the optimum, above zero hops.
    monkeypatch.setattr(milp._Model, "solve", lambda self, limit, relax=False: (
        solve(self, limit, relax) if relax else SimpleNamespace(x=None, status=1)))
    relaxed = solve_milp(trace, 3, 3, "inference", balance_slack=0.01, time_limit=60)
    assert relaxed.placement is None and 0.0 < relaxed.bound <= exact.bound + 1e-9
    monkeypatch.setattr(milp._Model, "solve", lambda self, limit, relax=False: SimpleNamespace(x=None, status=1))
    with pytest.raises(FoldingError, match="neither a placement nor a bound"):
        solve_milp(trace, 3, 3, "inference", balance_slack=0.01, time_limit=60)


def test_milp_refuses_replicas_and_large_instances():
    trace = training_trace(0)
    with pytest.raises(FoldingError, match="--redundant 0"):
        solve_milp(trace, 4, 2, redundant=1)
    big = synthesize(SynthSpec(64, 1, 3000, 6, seed=0))
    with pytest.raises(FoldingError, match="small instances only"):
        solve_milp(big, 8, 8)


# ----------------------------------------------------------------------------- solver behaviour
def test_solver_places_replicas_by_the_eplb_rule():
    trace = synthesize(SynthSpec(16, 3, 2000, 4, coactivation=0.7, group_size=4, skew=1.0))
    result = solve(trace, 4, 2, "training", redundant=2)
    p = result.placement.validate(num_experts=16, num_layers=3, ep_size=4)
    assert p.slots_per_rank == 16 // 4 + 2
    counts = trace.expert_counts()
    for layer in range(3):
        assert p.replica_counts()[layer].tolist() == replica_counts(counts[layer], 4 * 2).tolist()


def test_solver_beats_baselines_on_structured_traces():
    trace = synthesize(SynthSpec(32, 4, 4000, 4, coactivation=0.9, affinity=0.9, group_size=8, seed=5))
    train = evaluate(solve(trace, 8, 4, "training").placement, trace)
    infer = evaluate(solve(trace, 8, 4, "inference").placement, trace)
    base = evaluate(contiguous(trace, 8, 4).placement, trace)
    assert train.d_gpu < 0.8 * base.d_gpu and train.d_node < base.d_node
    assert infer.x_gpu < 0.5 * base.x_gpu


def test_the_large_instance_shortcuts_keep_quality(monkeypatch):
    from folding.placement import search, training

    trace = synthesize(SynthSpec(32, 4, 4000, 4, coactivation=0.9, affinity=0.9, group_size=8, seed=5))
    base = evaluate(contiguous(trace, 8, 4).placement, trace)
    small = {objective: solve(trace, 8, 4, objective) for objective in ("training", "inference")}
    monkeypatch.setattr(search, "LARGE_INSTANCE", 1)  # every instance counts as large
    large = {objective: solve(trace, 8, 4, objective) for objective in ("training", "inference")}
    # training: the same layers, from worker processes where there are two cores
    assert np.array_equal(large["training"].placement.layers, small["training"].placement.layers)
    assert ("worker_cpu_seconds" in large["training"].info) == (training.default_workers(4, 32) > 1)
    # inference: later passes only swap, and the result still beats contiguous by far
    fast = evaluate(large["inference"].placement, trace)
    assert fast.x_gpu < 0.5 * base.x_gpu
    assert fast.cost("inference") <= 1.1 * evaluate(small["inference"].placement, trace).cost("inference")


def test_warm_start_moves_at_most_the_budget_and_keeps_quality():
    spec = dict(num_experts=32, num_layers=3, num_tokens=4000, top_k=4, coactivation=0.9, group_size=8)
    before = synthesize(SynthSpec(**spec))
    after = synthesize(SynthSpec(**spec, drift=0.2, token_seed=7))
    previous = solve(before, 8, 4, "training").placement
    for objective in ("training", "inference"):
        warm = solve(after, 8, 4, objective, previous=previous, max_moved=0.1).placement
        assert warm.moved_fraction(previous) <= 0.1
        assert evaluate(warm, after).cost(objective) <= evaluate(previous, after).cost(objective) + 1e-9
    with pytest.raises(FoldingError, match="redundant slots per rank but 1 were asked"):
        solve(after, 8, 4, previous=previous, redundant=1)


def test_align_ranks_finds_the_best_relabelling():
    rng = np.random.default_rng(1)
    nodes = np.array([0, 0, 1, 1])
    home = np.repeat(np.arange(4), 3)
    ranks = rng.permutation(home)
    aligned = align_ranks(ranks, home, nodes)
    best = 0
    for nodes_swapped in (False, True):
        for inner in itertools.product(itertools.permutations([0, 1]), repeat=2):
            mapping = np.array([*inner[0], *(2 + np.array(inner[1]))])
            if nodes_swapped:
                mapping = (mapping + 2) % 4
            best = max(best, int(np.sum(mapping[ranks] == home)))
    assert int(np.sum(aligned == home)) == best
    # a relabelling keeps which items share a rank and a node
    assert all((ranks[v] == ranks[u]) == (aligned[v] == aligned[u]) for v in range(12) for u in range(12))
    assert all((nodes[ranks[v]] == nodes[ranks[u]]) == (nodes[aligned[v]] == nodes[aligned[u]])
               for v in range(12) for u in range(12))


def test_training_layers_in_worker_processes_equal_one_process():
    trace = synthesize(SynthSpec(32, 4, 3000, 4, coactivation=0.9, group_size=8))
    alone = solve(trace, 8, 4, "training", redundant=1, workers=1)
    side_by_side = solve(trace, 8, 4, "training", redundant=1, workers=2)
    assert np.array_equal(side_by_side.placement.layers, alone.placement.layers)
    assert "worker_cpu_seconds" not in alone.info
    assert 1 <= len(side_by_side.info["worker_cpu_seconds"]) <= 2
    # the workers are not forks of this (threaded) process
    from folding.placement.training import worker_context

    assert worker_context().get_start_method() in ("forkserver", "spawn")
    late = solve(trace, 8, 4, "training", time_limit=1e-6, workers=2)
    late.placement.validate(num_experts=32, num_layers=4)
    assert late.info["stopped_at_layer"] == 0


def test_time_limit_still_returns_a_valid_placement():
    trace = synthesize(SynthSpec(32, 6, 2000, 4, coactivation=0.9, group_size=8))
    for objective in ("training", "inference"):
        solve(trace, 8, 4, objective, time_limit=1e-6).placement.validate(num_experts=32, num_layers=6)


# ----------------------------------------------------------------------------- inference starts
def inference_cost(result, trace):
    return evaluate(result.placement, trace).cost("inference")


@pytest.mark.parametrize("seed", [14, 17])
def test_small_inference_keeps_the_cheaper_of_the_flat_and_node_first_starts(seed):
    """Whichever of the two wins, the solver's placement is that start's own result."""
    trace = synthesize(SynthSpec(16, 3, 1500, 2, coactivation=0.5, affinity=0.7, group_size=4, seed=seed,
                                 token_seed=seed))
    both, flat, node_first = (solve(trace, 4, 2, "inference", sampling_noise=False, starts=starts)
                              for starts in ([PackingStart(), NodeFirstStart()], [PackingStart()], [NodeFirstStart()]))
    cost, flat_cost, node_first_cost = (inference_cost(r, trace) for r in (both, flat, node_first))
    assert both.info["node_first"] is (node_first_cost < flat_cost)
    assert cost == pytest.approx(min(flat_cost, node_first_cost), abs=1e-12)
    kept = node_first if both.info["node_first"] else flat
    assert np.array_equal(both.placement.layers, kept.placement.layers)


def assert_kept_only_when_cheaper(trace, name, result, without):
    """``result`` ran the start ``name`` last, ``without`` the same starts but that one: the
    start is kept only when cheaper than the rest, and one not kept changes nothing."""
    assert name in result.info and name not in without.info
    cost, without_cost = inference_cost(result, trace), inference_cost(without, trace)
    if result.info[name]:
        assert cost < without_cost
    else:
        assert np.array_equal(result.placement.layers, without.placement.layers)
    return cost


@pytest.mark.parametrize("seed", [3, 5])
def test_small_inference_keeps_the_chain_start_only_when_it_is_cheaper(seed):
    """12 experts x 4 ranks (4^12 states): the solver also searches from the chain program's
    placement; the chain bound stays below what it keeps."""
    from folding.placement.chain_bound import inference_chain_bound

    trace = synthesize(SynthSpec(12, 4, 1500, 2, coactivation=0.7, affinity=0.7, group_size=4, seed=seed,
                                 token_seed=seed))
    result, without = (solve(trace, 4, 2, "inference", sampling_noise=False, starts=starts)
                       for starts in ([PackingStart(), NodeFirstStart(), ChainStart()],
                                      [PackingStart(), NodeFirstStart()]))
    cost = assert_kept_only_when_cheaper(trace, "chain_start", result, without)
    assert inference_chain_bound(trace, 4, 2).bound <= cost


@pytest.mark.parametrize("start", DEFAULT_STARTS, ids=lambda start: start.name)
def test_every_small_inference_start_keeps_the_sampling_noise_balance_rule(start):
    """Each start alone (the first start is kept whatever it costs) ends within each layer's
    budget under the default rule. The chain program balances by fitted loads only, so its
    start is repaired before the search (before the repair, 4 of these 6 layers were over)."""
    from folding.placement.inference import layer_search
    from folding.placement.problem import DEFAULT_BALANCE_SLACK, build_items

    trace, _ = synthesize(SynthSpec(12, 6, 6000, 2, coactivation=0.7, affinity=0.7, group_size=4)).split(0.5)
    result = solve(trace, 4, 2, "inference", starts=[start])
    assert "passes" in result.info  # the start applied, and its search ran
    for layer, items in enumerate(build_items(trace, 4, 0, DEFAULT_BALANCE_SLACK)):
        items.ranks = np.array([result.placement.ranks_of(layer, e)[0] for e in items.experts])
        assert layer_search(items, np.arange(4) // 2).within_budget(), layer


def test_small_inference_keeps_the_node_split_start_only_when_it_is_cheaper():
    """The certificate's instance (16 experts x 8 layers x 4 ranks in 2 nodes, noise-free
    balance) with the default starts, the node-split start last."""
    trace, _ = synthesize(SynthSpec(16, 8, 8000, 2, coactivation=0.7, affinity=0.7, group_size=4)).split(0.5)
    assert isinstance(DEFAULT_STARTS[-1], NodeSplitStart)
    result = solve(trace, 4, 2, "inference", sampling_noise=False)
    without = solve(trace, 4, 2, "inference", sampling_noise=False, starts=DEFAULT_STARTS[:-1])
    assert_kept_only_when_cheaper(trace, "node_split_start", result, without)
    # and it leaves no start out when time is short: none past the deadline
    hurried = solve(trace, 4, 2, "inference", sampling_noise=False, time_limit=1.0)
    assert "node_split_start" not in hurried.info
    hurried.placement.validate(num_experts=16, num_layers=8, ep_size=4)


class UnbalancedStart:
    """The ExFlow-style placement: fewer hops, no balance rule."""

    name = "unbalanced"

    def __init__(self, placement):
        self.placement = placement

    def applies(self, run):
        return True

    def place(self, run):
        run.set_ranks([np.array([self.placement.ranks_of(layer, e)[0] for e in items.experts])
                       for layer, items in enumerate(run.layers)])
        return {}


def test_a_start_outside_the_balance_limits_is_never_kept():
    trace = synthesize(SynthSpec(16, 3, 1500, 2, coactivation=0.5, affinity=0.7, skew=1.0, group_size=4, seed=17,
                                 token_seed=17))
    unbalanced = UnbalancedStart(exflow(trace, 4, 2).placement)
    flat = solve(trace, 4, 2, "inference", starts=[PackingStart()])
    result = solve(trace, 4, 2, "inference", starts=[PackingStart(), unbalanced])
    assert result.info["unbalanced"] is False
    assert np.array_equal(result.placement.layers, flat.placement.layers)
    # alone it is the first start, kept whatever it costs: it was cheaper, the limits turned it down
    alone = solve(trace, 4, 2, "inference", starts=[unbalanced])
    assert inference_cost(alone, trace) < inference_cost(flat, trace)
    assert evaluate(alone.placement, trace).balance < evaluate(flat.placement, trace).balance


# ----------------------------------------------------------------------------- baselines
def test_eplb_is_hierarchical_and_balanced():
    trace = synthesize(SynthSpec(16, 2, 3000, 4, skew=1.2))
    p = eplb(trace, 4, 2, redundant=1).placement
    assert p.slots_per_rank == 5
    counts = trace.expert_counts()
    for layer in range(2):
        nodes = p.rank_nodes[p.slot_ranks]
        experts_of_node = [set(p.layers[layer][nodes == n].tolist()) for n in range(2)]
        assert not experts_of_node[0] & experts_of_node[1]  # replicas stay inside their node
        assert [len(e) for e in experts_of_node] == [8, 8]
        # each node's spare slots (2 ranks x 1) replicate its hottest experts per copy
        for members in experts_of_node:
            members = sorted(members)
            expected = replica_counts(counts[layer][members], 2)
            assert [p.replicas_of(layer, e).__len__() for e in members] == expected.tolist()
    assert evaluate(p, trace).balance > evaluate(contiguous(trace, 4, 2).placement, trace).balance


def test_exflow_follows_perfect_chains_with_equal_counts():
    trace = synthesize(SynthSpec(16, 4, 1000, 2, affinity=1.0))
    p = exflow(trace, 4, 2).placement
    assert p.slots_per_rank == 4 and p.replica_counts().max() == 1
    assert evaluate(p, trace).x_gpu == 0.0
    assert evaluate(contiguous(trace, 4, 2).placement, trace).x_gpu > 0.5


def test_placements_for_tiny_traces_by_hand():
    # Two groups that always fire together: {0, 3} and {1, 2}; contiguous splits both.
    topk = np.array([[[0, 3], [1, 2], [3, 0], [2, 1]]], dtype=np.int32)
    trace = RoutingTrace(topk, 4)
    assert evaluate(contiguous(trace, 2, 1).placement, trace).d_gpu == 2.0
    best = solve(trace, 2, 1, "training", sampling_noise=False)
    assert evaluate(best.placement, trace).d_gpu == 1.0
    assert sorted(sorted(best.placement.layers[0][r * 2:(r + 1) * 2].tolist()) for r in range(2)) == [[0, 3], [1, 2]]


def test_reassigning_the_most_misplaced_items_by_hand():
    # pairs a = (0, 1) affinity 30, b = (2, 3) affinity 20, c = (4, 5) affinity 10, all split:
    # rank 0 holds 0 and 3, rank 1 holds 2 and 5, rank 2 holds 4 and 1.
    affinity = np.zeros((6, 6))
    for (v, u), weight in (((0, 1), 30.0), ((2, 3), 20.0), ((4, 5), 10.0)):
        affinity[v, u] = affinity[u, v] = weight
    ranks = np.array([0, 2, 1, 0, 2, 1])
    search = LayerSearch(ranks, np.ones(6), np.zeros(3, dtype=int), affinity=affinity, home=ranks, max_moved=3)
    search.reassign_most_misplaced(3)
    # Items 0, 1 (desire 30) and 2 (desire 20) trade the ranks 0, 2, 1 they hold; against the
    # items that stay, only item 2 gains anything, next to its partner 3 on rank 0.
    assert search.rank[2] == search.rank[3] == 0
    assert search.rank[4] == 2 and search.rank[5] == 1
    assert sorted(search.rank[[0, 1, 2]].tolist()) == [0, 1, 2]
    fresh = LayerSearch(search.rank, np.ones(6), np.zeros(3, dtype=int), affinity=affinity)
    assert np.allclose(search.rank_affinity, fresh.rank_affinity) and search.cost() == pytest.approx(-20.0)
