"""The fast expert placement solver, for the "training" and "inference" objectives: ``solve``
checks the instance, builds every layer's items and balance limits (``problem``), and runs the
objective's search; for inference it also chooses among the search's starts.

- training: every layer alone (``training``).
- inference: block coordinate descent over layers (``inference``) from each start that applies
  (``starts``; ``solve`` takes them as ``starts=``, by default ``starts.DEFAULT_STARTS``),
  keeping the cheapest placement within every layer's balance limits.
- with a previous placement both objectives start from it and move at most ``max_moved`` of
  each layer's items; inference then searches from it alone.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np

from folding.errors import FoldingError
from folding.placement.inference import InferenceRun
from folding.placement.metrics import objective_weights
from folding.placement.placement import Placement
from folding.placement.problem import DEFAULT_BALANCE_SLACK, SolveResult, build_items, check_sizes
from folding.placement.starts import DEFAULT_STARTS, Start
from folding.placement.trace import RoutingTrace
from folding.placement.training import solve_training_layers


def solve_inference(run: InferenceRun, starts: Sequence[Start]) -> dict:
    """Search from every start that applies, in order, each from balanced packing. The first
    start to offer a placement is kept whatever it costs (the default list begins with balanced
    packing, within the limits by construction); a later one replaces it when it costs fewer
    hops and every layer is within its limits, ``info[start.name]`` saying whether it did.
    Updates ``run.layers`` in place; with a previous placement only the search from it runs."""
    if run.warm:
        return run.search()
    packing = run.ranks()
    info: dict = {}
    best, best_cost = None, np.inf
    for start in starts:
        run.set_ranks(packing)
        if not start.applies(run):
            continue
        figures = start.place(run)
        if figures is None:
            continue
        cost = run.cost()
        if best is None:
            info.update(figures)
        else:
            info[start.name] = cost < best_cost and run.within_limits()
            if not info[start.name]:
                continue
        best, best_cost = run.ranks(), cost
    run.set_ranks(packing if best is None else best)
    return info


def solve(trace: RoutingTrace, ep_size: int, gpus_per_node: int, objective: str = "training",
          redundant: int = 0, time_limit: Optional[float] = None, previous: Optional[Placement] = None,
          max_moved: float = 0.1, balance_slack: float = DEFAULT_BALANCE_SLACK,
          sampling_noise: bool = True, progress: bool = False, workers: Optional[int] = None,
          starts: Sequence[Start] = DEFAULT_STARTS) -> SolveResult:
    """Place the experts of every layer of ``trace`` on ``ep_size`` ranks (see module docstring).

    ``sampling_noise=False`` balances the fitted loads only (the exact MILP's constraint).
    ``workers``: processes that place training layers side by side (None: ``default_workers``).
    ``starts``: the inference search's starts (``starts.Start``), in order.
    """
    start = time.perf_counter()
    objective_weights(objective)
    check_sizes(trace.num_experts, ep_size, gpus_per_node, redundant)
    if previous is not None:
        previous.validate(num_experts=trace.num_experts, num_layers=trace.num_layers, ep_size=ep_size,
                          source="previous placement")
        if previous.redundant_slots != redundant:
            raise FoldingError(f"previous placement has {previous.redundant_slots} redundant slots per "
                               f"rank but {redundant} were asked for")
    deadline = None if time_limit is None else start + time_limit
    slots_per_rank = trace.num_experts // ep_size + redundant
    rank_nodes = np.arange(ep_size) // gpus_per_node
    layers = build_items(trace, ep_size, redundant, balance_slack, previous, sampling_noise)
    budget = None if previous is None else int(np.floor(max_moved * ep_size * slots_per_rank))
    info = {"objective": objective}
    if objective == "training":
        info.update(solve_training_layers(layers, rank_nodes, slots_per_rank, deadline, budget,
                                          workers, progress))
    else:
        rank_weight, node_weight = objective_weights("inference")
        run = InferenceRun(trace, layers, rank_nodes, slots_per_rank, rank_weight, node_weight, deadline, budget,
                           progress)
        info.update(solve_inference(run, starts))
    placement = Placement.from_rank_assignment(trace.num_experts, ep_size, gpus_per_node,
                                               [i.experts for i in layers], [i.ranks for i in layers])
    return SolveResult(placement, time.perf_counter() - start, info)
