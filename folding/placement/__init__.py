"""Expert placement: routing traces, placement files, metrics, baselines and the solver.

One module per concern: ``placement`` (the placement file the token dispatcher loads),
``trace`` (the routing trace file, its validation and statistics), ``recorder`` (collecting a
trace during training), ``synth`` (synthetic traces), ``metrics`` (scoring a placement on a
trace), ``packing`` (replica counts and balanced packing), ``search`` (swap local search of one
layer), ``problem`` (what every placement method solves: items, balance limits, hop costs),
``training`` and ``inference`` (the fast solver's search for each objective), ``starts`` (the
inference search's starts), ``solver`` (the fast solver), ``baselines`` (contiguous,
EPLB-style, ExFlow-style), ``milp`` (the exact solver that certifies small instances),
``chain_bound`` (a lower bound on the inference objective of small instances),
``node_program`` (a dynamic program over layers, one of the starts) and ``plot``.

Imports go one way: ``problem`` builds on ``packing``, ``search``, ``placement`` and ``trace``;
``training``, ``inference``, ``milp``, ``chain_bound`` and ``node_program`` on ``problem``;
``starts`` on ``inference``, ``chain_bound`` and ``node_program``; ``solver`` on them all.
"""

from folding.placement.metrics import PlacementMetrics, evaluate
from folding.placement.placement import Placement
from folding.placement.recorder import TraceRecorder
from folding.placement.trace import RoutingTrace, load_trace

__all__ = ["Placement", "PlacementMetrics", "RoutingTrace", "TraceRecorder", "evaluate", "load_trace"]
