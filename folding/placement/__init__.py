"""Expert placement: routing traces, placement files, metrics, baselines and the solver.

``Placement`` (placement.py) is the file format the token dispatcher loads; ``RoutingTrace``
(trace.py) the routing trace format; ``evaluate`` (metrics.py) scores a placement on a trace;
``solve`` (solver.py) is the fast solver, ``baselines.py`` the reference placements and
``milp.py`` the exact solver that certifies small instances.
"""

from folding.placement.metrics import PlacementMetrics, evaluate
from folding.placement.placement import Placement
from folding.placement.recorder import TraceRecorder
from folding.placement.trace import RoutingTrace, load_trace

__all__ = ["Placement", "PlacementMetrics", "RoutingTrace", "TraceRecorder", "evaluate", "load_trace"]
