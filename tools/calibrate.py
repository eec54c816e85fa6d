"""Fit the step-time model's global parameters to the published MoE training measurements, and
show how well it predicts each one when that row is left out of the fit.

Prints the fitted parameters, a table of every row (published MFU, predicted by the fit on all
rows, predicted by the fit on the others, the error), the Table 3 folded-vs-unfolded gaps, and
ends with one JSON line. ``--write`` stores the fit in folding/cost/calibration.py (what
``folding plan`` and ``folding predict`` use).

    python tools/calibrate.py [--write] [--no-loo]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from folding.commands.common import format_table  # noqa: E402
from folding.cost import calibration as calibration_module  # noqa: E402
from folding.cost.calibration import FITTED, FITTED_NAMES  # noqa: E402
from folding.cost.fit import fit, leave_one_out, row_model, summary  # noqa: E402
from folding.cost.published import ROWS, table3_pairs  # noqa: E402

MEDIAN_TARGET, WORST_TARGET, GAP_TARGET = 3.0, 6.0, 5.0


def write_fitted(cal) -> str:
    """Replace the fitted block of folding/cost/calibration.py with ``cal``."""
    path = calibration_module.__file__
    text = open(path).read()
    body = "".join(f"    {n}={getattr(cal, n)!r},\n" for n in FITTED_NAMES)
    block = f"FITTED = Calibration(\n{body})\n"
    new, count = re.subn(r"FITTED = Calibration\(\n.*?\n\)\n", lambda _: block, text, flags=re.S)
    if count != 1:
        raise SystemExit(f"{path}: the fitted block was not found")
    with open(path, "w") as f:
        f.write(new)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help="store the fit in folding/cost/calibration.py")
    parser.add_argument("--no-loo", action="store_true", help="skip the leave-one-out refits")
    args = parser.parse_args()

    start = time.perf_counter()
    models = [row_model(r) for r in ROWS]
    cal, rms = fit(models)
    fit_seconds = time.perf_counter() - start
    print(f"Fitted on {len(models)} published rows in {fit_seconds:.1f} s (RMS error {rms:.2f} "
          "MFU points):\n")
    print(format_table(["parameter", "fitted", "stored"],
                       [[n, f"{getattr(cal, n):.4g}", f"{getattr(FITTED, n):.4g}"]
                        for n in FITTED_NAMES]))

    loo = None if args.no_loo else leave_one_out(models, cal)
    rows = []
    for i, m in enumerate(models):
        r = m.row
        fitted = m.mfu(cal)
        cells = [r.key, r.recipe, r.gpus, f"TP{r.tp} PP{r.pp} VPP{r.vpp or 1} EP{r.ep} ETP{r.etp}",
                 r.precision, r.global_batch_size, f"{100 * r.mfu:.1f}", f"{100 * fitted:.1f}"]
        if loo:
            cells += [f"{100 * loo[i].held_out:.1f}", f"{loo[i].error_points:+.1f}"]
        rows.append(cells)
    headers = ["row", "recipe", "GPUs", "folding", "prec.", "GBS", "published %", "fit %"]
    if loo:
        headers += ["held out %", "error pts"]
    print("\nPredicted vs published MFU (Megatron FLOPs / 989.4 TFLOP/s per H100):\n")
    print(format_table(headers, rows))

    by_key = {m.row.key: m for m in models}
    loo_by_key = {r.key: r for r in loo} if loo else {}
    gaps, gap_rows = [], []
    for name, (folded, unfolded) in table3_pairs().items():
        pred = 100 * (by_key[folded.key].mfu(cal) - by_key[unfolded.key].mfu(cal))
        held = (100 * (loo_by_key[folded.key].held_out - loo_by_key[unfolded.key].held_out)
                if loo else None)
        pub = 100 * (folded.mfu - unfolded.mfu)
        gaps.append({"pair": name, "published_gap_points": pub, "predicted_gap_points": pred,
                     "held_out_gap_points": held,
                     "folded_faster": pred > 0, "within_target": abs(pred - pub) <= GAP_TARGET})
        gap_rows.append([name, f"{pub:.1f}", f"{pred:.1f}", "-" if held is None else f"{held:.1f}"])
    print("\nTable 3: folded minus unfolded MFU, points\n")
    print(format_table(["model", "published", "predicted (fit)", "predicted (held out)"], gap_rows))

    out = {"tool": "calibrate", "rows": len(models), "rms_points": rms,
           "fitted": {n: getattr(cal, n) for n in FITTED_NAMES}, "table3_gaps": gaps,
           "fit_seconds": fit_seconds}
    if loo:
        s = summary(loo)
        print(f"\nleave-one-out: median |error| {s['median_abs_error_points']:.2f} points "
              f"(target {MEDIAN_TARGET:g}), worst {s['worst_abs_error_points']:.2f} "
              f"(target {WORST_TARGET:g})")
        out.update(s)
        out["loo"] = [{"row": r.key, "published": r.published, "fitted": r.fitted,
                       "held_out": r.held_out} for r in loo]
        out["meets_targets"] = (s["median_abs_error_points"] <= MEDIAN_TARGET
                                and s["worst_abs_error_points"] <= WORST_TARGET
                                and all(g["folded_faster"] and g["within_target"] for g in gaps))
    if args.write:
        print(f"\nwrote the fit to {write_fitted(cal)}")
    out["seconds"] = time.perf_counter() - start
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
