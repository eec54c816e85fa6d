"""The placements the inference search starts from, as objects ``solver.solve`` takes
(``starts=``); it keeps the cheapest result (``solver.solve_inference``).

A start says whether it suits an instance (``applies``: its size, and whether its estimated
time is left before the deadline) and searches from its placement (``place``), leaving the
result in the run's layers. ``DEFAULT_STARTS``, in order:

- ``PackingStart``: greedy balanced packing, searched by ``inference.inference_search``;
- ``NodeFirstStart``: small multi-node instances, the same searched with node hops weighted
  heavily first (nodes settle before the ranks in them);
- ``ChainStart``: instances of at most 4^12 rank assignments, the placement that follows each
  layer pair's matching at least cost (``chain_bound.chain_program``);
- ``NodeSplitStart``: instances with few enough node placements, a dynamic program over
  layers at the node level, then the rank level (``node_program``).

The programs' placements are balanced by their own rule (the chain program's ignores sampling
noise) and are repaired before the search (``InferenceRun.search_from``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

from folding.placement import node_program
from folding.placement.chain_bound import applicable, chain_program
from folding.placement.inference import InferenceRun

NODE_FIRST_WEIGHT = 16.0
"""Weight of a node hop in the node-first start (a rank hop weighs 1)."""
NODE_FIRST_MAX_ITEMS = 32
"""Layers of at most this many items also get the node-first start. Measured: 16 experts x 8
layers x 4 ranks (2 per node) 0.569 -> 0.536 hop cost; 64 experts x 16 layers x 16 ranks 0.4%
lower for twice the time; 256 experts x 16 layers x 64 ranks: the node-first start alone is 3% worse."""
CHAIN_START_MAX_STATES = 4 ** 12
"""Instances of at most this many rank assignments (P^E) also search from the placement of
``chain_bound.chain_program``, which follows each layer pair's matching at least cost."""


class Start(Protocol):
    """One placement the inference search starts from."""

    name: str
    """Its key in the solve's ``info``: whether its result was kept."""

    def applies(self, run: InferenceRun) -> bool:
        """Whether it suits the instance and its estimated time is left."""

    def place(self, run: InferenceRun) -> Optional[dict]:
        """Search from this start; ``run.layers`` hold balanced packing on entry and the
        result on return. Returns the search's figures (``passes``), or None when the start
        has no placement to offer."""


@dataclass(frozen=True)
class PackingStart:
    name: str = "packing"

    def applies(self, run: InferenceRun) -> bool:
        return True

    def place(self, run: InferenceRun) -> Optional[dict]:
        return run.search()


@dataclass(frozen=True)
class NodeFirstStart:
    name: str = "node_first"
    weight: float = NODE_FIRST_WEIGHT
    max_items: int = NODE_FIRST_MAX_ITEMS

    def applies(self, run: InferenceRun) -> bool:
        return bool(run.rank_nodes.max() > 0 and len(run.layers[0].experts) <= self.max_items)

    def place(self, run: InferenceRun) -> Optional[dict]:
        run.search(run.node_weight * self.weight)
        return run.search(resume=True)


@dataclass(frozen=True)
class ChainStart:
    name: str = "chain_start"
    max_states: int = CHAIN_START_MAX_STATES

    def applies(self, run: InferenceRun) -> bool:
        """One item per expert, ranks in whole nodes, few enough states, and the program's
        estimated time (10 ns per state and line and layer) left."""
        E, P, per_node = run.trace.num_experts, len(run.rank_nodes), run.gpus_per_node
        if not run.one_item_per_expert or P % per_node or not applicable(E, P, per_node, self.max_states):
            return False
        return run.has_time_for(1e-8 * P ** E * E * (len(run.layers) - 1))

    def place(self, run: InferenceRun) -> Optional[dict]:
        program = chain_program(run.transitions, run.trace.expert_counts().astype(np.float64), run.limits(),
                                len(run.rank_nodes), run.gpus_per_node)
        return run.search_from([ranks[items.experts] for items, ranks in zip(run.layers, program.ranks)])


@dataclass(frozen=True)
class NodeSplitStart:
    name: str = "node_split_start"
    keep: int = node_program.KEEP

    def applies(self, run: InferenceRun) -> bool:
        """One item per expert, several whole nodes, few enough placements
        (``node_program.applicable``), and the program's estimated time left."""
        E, P, per_node = run.trace.num_experts, len(run.rank_nodes), run.gpus_per_node
        if not run.one_item_per_expert or not node_program.applicable(E, P, per_node, self.keep):
            return False
        return run.has_time_for(node_program.estimated_seconds(E, P, per_node, len(run.layers), self.keep))

    def place(self, run: InferenceRun) -> Optional[dict]:
        layers = run.layers
        ranks = node_program.node_split_program(
            np.stack([run.transitions[l][np.ix_(layers[l].experts, layers[l + 1].experts)]
                      for l in range(len(layers) - 1)]),
            [i.loads for i in layers], [i.affinity() for i in layers], run.limits(), run.hops, run.gpus_per_node,
            layers[0].noise, self.keep)
        return None if ranks is None else run.search_from(ranks)


DEFAULT_STARTS = (PackingStart(), NodeFirstStart(), ChainStart(), NodeSplitStart())
