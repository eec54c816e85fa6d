"""Fitting the step-time model's global parameters to published measurements (pure computation).

``fit`` is a bounded least-squares fit (scipy's trust-region reflective) of the parameters named
in ``folding.cost.calibration.FITTED_NAMES`` to the MFU of every row, in MFU points, from a few
starting points; ``leave_one_out`` refits without each row in turn and predicts it. One set of
parameters serves every row: nothing in the fit is per model or per row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from folding.cost.calibration import BOUNDS, FITTED_NAMES, Calibration
from folding.cost.hardware import get_profile
from folding.cost.predict import Predictor
from folding.cost.published import PublishedRow
from folding.recipe import load_recipe


@dataclass
class RowModel:
    """A published row, set up once: its predictor and folding."""

    row: PublishedRow
    predictor: Predictor
    spec: object

    def mfu(self, calibration: Calibration) -> float:
        r = self.row
        return self.predictor.step_time(self.spec, r.micro_batch_size, r.recompute, calibration).mfu


def row_model(row: PublishedRow) -> RowModel:
    recipe = load_recipe(row.recipe)
    training = dataclasses.replace(recipe.training, seq_length=row.seq_length,
                                   global_batch_size=row.global_batch_size,
                                   micro_batch_size=row.micro_batch_size,
                                   precision=row.precision, recompute=row.recompute)
    predictor = Predictor(recipe.model, training, get_profile(row.gpu),
                          pipeline_layers=row.pipeline_layers, ep_overlap=row.ep_overlap,
                          force_balance=row.force_balance)
    spec = predictor.spec(row.gpus, row.gpus_per_node, tp=row.tp, cp=row.cp, pp=row.pp,
                          vpp=row.vpp, ep=row.ep, etp=row.etp)
    return RowModel(row, predictor, spec)


def _to_calibration(x: np.ndarray, base: Calibration) -> Calibration:
    return dataclasses.replace(base, **{n: float(v) for n, v in zip(FITTED_NAMES, x)})


def _to_vector(cal: Calibration) -> np.ndarray:
    return np.array([getattr(cal, n) for n in FITTED_NAMES], dtype=float)


def residuals(cal: Calibration, models: Sequence[RowModel]) -> np.ndarray:
    """Predicted minus published MFU, in points, per row."""
    return np.array([100.0 * (m.mfu(cal) - m.row.mfu) for m in models])


# Starting points: the profile's assumptions with no overhead, and two corners of the bounds.
_STARTS = (
    dict(gemm_efficiency=0.75, gemm_half_dim=64.0, attention_efficiency=0.5,
         fp8_cast_bytes=3.0, a2a_nvlink_efficiency=0.5, a2a_network_efficiency=0.6,
         routing_imbalance=0.2, layer_overhead_us=50.0, moe_overhead_us=200.0),
    dict(gemm_efficiency=0.65, gemm_half_dim=512.0, attention_efficiency=0.4,
         fp8_cast_bytes=5.0, a2a_nvlink_efficiency=0.3, a2a_network_efficiency=0.4,
         routing_imbalance=0.5, layer_overhead_us=200.0, moe_overhead_us=1000.0),
)


def fit(models: Sequence[RowModel], base: Optional[Calibration] = None,
        starts: Sequence[Dict[str, float]] = _STARTS) -> Tuple[Calibration, float]:
    """(the calibration of least squared MFU error over ``models``, its RMS error in points).

    The parameters are scaled to [0, 1] over their bounds; the best of the starts wins."""
    from scipy.optimize import least_squares

    base = base or Calibration(**_STARTS[0])
    lo = np.array([BOUNDS[n][0] for n in FITTED_NAMES])
    hi = np.array([BOUNDS[n][1] for n in FITTED_NAMES])

    def f(u):
        return residuals(_to_calibration(lo + u * (hi - lo), base), models)

    best = None
    for start in starts:
        u0 = (_to_vector(dataclasses.replace(base, **start)) - lo) / (hi - lo)
        result = least_squares(f, np.clip(u0, 0.0, 1.0), bounds=(0.0, 1.0), method="trf",
                               diff_step=1e-3, xtol=1e-10, ftol=1e-10, max_nfev=400)
        if best is None or result.cost < best.cost:
            best = result
    cal = _to_calibration(lo + best.x * (hi - lo), base)
    return cal, float(np.sqrt(np.mean(best.fun ** 2)))


@dataclass(frozen=True)
class LooResult:
    key: str
    published: float
    fitted: float
    """MFU predicted with the fit on every row."""
    held_out: float
    """MFU predicted with the fit on the other rows."""

    @property
    def error_points(self) -> float:
        return 100.0 * (self.held_out - self.published)


def leave_one_out(models: Sequence[RowModel], full: Calibration) -> List[LooResult]:
    """Each row predicted by a fit on the others (started from the full fit and the usual
    starts)."""
    out = []
    start = {n: getattr(full, n) for n in FITTED_NAMES}
    for i, m in enumerate(models):
        others = [o for j, o in enumerate(models) if j != i]
        cal, _ = fit(others, base=full, starts=(start,) + tuple(_STARTS))
        out.append(LooResult(m.row.key, m.row.mfu, m.mfu(full), m.mfu(cal)))
    return out


def summary(loo: Sequence[LooResult]) -> Dict[str, float]:
    errors = np.abs([r.error_points for r in loo])
    return {"median_abs_error_points": float(np.median(errors)),
            "worst_abs_error_points": float(errors.max()),
            "mean_abs_error_points": float(errors.mean())}
