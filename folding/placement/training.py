"""The training objective's search, layer by layer: layers are independent under it, so each
is placed alone (on large instances side by side, one worker process per core).

Items that tokens pick together (the layer's co-activation matrix) are grown into nodes, then
into ranks inside each node, heaviest item first (``grow_layer``); swap local search
(``search.LayerSearch``) then maximises co-located affinity, weighted 4x across nodes (a
pairwise stand-in for D_gpu + 4 D_node), by continuation on the price of excess load, with
whole-rank exchanges between nodes; small layers get iterated local search on top. With a
previous placement a layer moves at most ``max_moved`` of its items, and a fresh solution
relabelled to match the previous one (``align_ranks``) is tried too.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import List, Optional, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from folding.placement.metrics import objective_weights
from folding.placement.problem import LayerItems
from folding.placement.search import is_large, kicks_for


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


def solve_training_layer(items: LayerItems, rank_nodes: np.ndarray, slots_per_rank: int,
                         deadline: Optional[float], max_moved: Optional[int], seed: int = 0) -> np.ndarray:
    """Greedy growth, continuation search, then iterated local search: rotate the ranks of a
    few random items and search again, keeping the result when it is cheaper."""
    rank_weight, node_weight = objective_weights("training")
    affinity = items.affinity()

    def search_from(start):
        return items.search(start, rank_nodes, rank_weight, node_weight, home=items.home,
                            max_moved=max_moved, affinity=affinity)

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


def default_workers(num_layers: int, num_items: int) -> int:
    """Processes for the training objective: every available core on large instances, else 1."""
    if not is_large(num_layers, num_items):
        return 1
    return max(1, min(num_layers, len(os.sched_getaffinity(0))))


def worker_context() -> multiprocessing.context.BaseContext:
    """How worker processes start: from a fork server where the platform has one, else spawned.

    Forking the caller itself is unsafe when it runs threads (torch's and gloo's, in a training
    process): a lock another thread held at the fork stays held in the child forever. The fork
    server is a fresh single-threaded interpreter that has imported this module once, so workers
    start as fast as forks. As with any spawned worker, a calling script needs the
    ``if __name__ == "__main__":`` guard.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        return context
    return multiprocessing.get_context("spawn")


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
            with ProcessPoolExecutor(workers, mp_context=worker_context()) as pool:
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
