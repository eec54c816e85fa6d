"""Expert placement: routing traces, placement files, metrics, baselines and the solver.

One module per concern: ``placement`` (the placement file the token dispatcher loads),
``trace`` (the routing trace file, its validation and statistics), ``recorder`` (collecting a
trace during training), ``synth`` (synthetic traces), ``metrics`` (scoring a placement on a
trace), ``packing`` (replica counts and balanced packing), ``search`` (swap local search of one
layer), ``solver`` (the fast solver), ``baselines`` (contiguous, EPLB-style, ExFlow-style),
``milp`` (the exact solver that certifies small instances) and ``plot``.
"""

from folding.placement.metrics import PlacementMetrics, evaluate
from folding.placement.placement import Placement
from folding.placement.recorder import TraceRecorder
from folding.placement.trace import RoutingTrace, load_trace

__all__ = ["Placement", "PlacementMetrics", "RoutingTrace", "TraceRecorder", "evaluate", "load_trace"]
