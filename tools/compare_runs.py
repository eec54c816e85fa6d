#!/usr/bin/env python3
"""Compare two Megatron-LM training logs: per-iteration losses side by side and iteration time.

Made for tools/gpu_check.sh, which trains the same model twice (stock Megatron-LM, then through
``folding megatron``) and asks whether the second trained like the first. Both logs are read
with ``folding.cost.mfu_log.iteration_metrics``, the package's one reader of Megatron's
iteration line. Every field whose name ends in "loss" (lm loss, load_balancing_loss, z_loss,
MTP losses; not "loss scale") is compared at every iteration: the relative difference is
|a - b| / max(|a|, |b|) (0 when both are 0). Iteration time is the mean of "elapsed time per
iteration (ms)" over the iterations both logs print after the first K (--skip-first, default
2: start-up, compilation and allocator warm-up land there); the ratio is B over A.

    python tools/compare_runs.py LOG_A LOG_B [--rtol 1e-3] [--skip-first 2] [--json]

Prints the table and a summary (only the JSON with --json); the last line is one JSON object.
Exit status 0 when every loss is within rtol at every iteration and both logs print the same
iterations and losses, 1 otherwise, 2 when a log cannot be read or has no iteration lines.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from statistics import mean
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from folding.commands.common import format_table  # noqa: E402
from folding.cost.mfu_log import ELAPSED_MS, IterationMetrics, iteration_metrics  # noqa: E402
from folding.errors import FoldingError  # noqa: E402


def load(path: str) -> List[IterationMetrics]:
    """A log's iteration lines; FoldingError when it cannot be read or has none."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        raise FoldingError(f"cannot read log {path}: {e.strerror or e}") from None
    lines = iteration_metrics(text)
    if not lines:
        raise FoldingError(f"no Megatron iteration lines ('iteration N/ M | ...') in {path}")
    return lines


def by_iteration(lines: Sequence[IterationMetrics]) -> tuple:
    """({iteration: line}, iterations printed more than once). A run resumed into the same log
    prints the iterations after its checkpoint again; the later line is the one that continued."""
    table: Dict[int, IterationMetrics] = {}
    repeated = set()
    for line in lines:
        if line.iteration in table:
            repeated.add(line.iteration)
        table[line.iteration] = line
    return table, sorted(repeated)


def rel_diff(a: float, b: float) -> float:
    """|a - b| / max(|a|, |b|): symmetric, 0 for equal values, inf when one is not finite and
    they differ."""
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b))


def _json_number(x: Optional[float]) -> Optional[float]:
    """JSON has no inf or NaN: those become null (the within_rtol flags still say False)."""
    return x if x is None or math.isfinite(x) else None


def compare(lines_a: Sequence[IterationMetrics], lines_b: Sequence[IterationMetrics],
            rtol: float = 1e-3, skip_first: int = 2) -> dict:
    """The comparison as a JSON-ready dict; ``ok`` is what the exit status reports."""
    a, repeated_a = by_iteration(lines_a)
    b, repeated_b = by_iteration(lines_b)
    common = sorted(set(a) & set(b))
    names: List[str] = []
    for line in list(a.values()) + list(b.values()):
        names += [n for n in line.losses() if n not in names]

    losses = {}
    for name in names:
        worst, at = 0.0, None
        only_a, only_b = [], []
        for it in common:
            va, vb = a[it].metrics.get(name), b[it].metrics.get(name)
            if va is None and vb is None:
                continue  # neither printed it here (a NaN average is not printed)
            if vb is None:
                only_a.append(it)
                continue
            if va is None:
                only_b.append(it)
                continue
            d = rel_diff(va, vb)
            if at is None or d > worst:
                worst, at = d, it
        losses[name] = {"max_rel_diff": _json_number(worst) if at is not None else None,
                        "at_iteration": at,
                        "within_rtol": at is not None and worst <= rtol and not only_a
                        and not only_b,
                        "only_in_a": only_a, "only_in_b": only_b}

    steady = [it for it in common if it > skip_first
              and ELAPSED_MS in a[it].metrics and ELAPSED_MS in b[it].metrics]
    time = {"iterations": len(steady), "first": steady[0] if steady else None,
            "last": steady[-1] if steady else None,
            "mean_ms_a": None, "mean_ms_b": None, "ratio_b_over_a": None}
    if steady:
        ms_a = mean(a[it].metrics[ELAPSED_MS] for it in steady)
        ms_b = mean(b[it].metrics[ELAPSED_MS] for it in steady)
        time.update(mean_ms_a=ms_a, mean_ms_b=ms_b,
                    ratio_b_over_a=ms_b / ms_a if ms_a > 0 else None)

    missing_in_a, missing_in_b = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    within = bool(losses) and all(v["within_rtol"] for v in losses.values())
    per_iteration = [{"iteration": it,
                      "a": {n: _json_number(v) for n, v in a[it].losses().items()},
                      "b": {n: _json_number(v) for n, v in b[it].losses().items()},
                      "elapsed_ms_a": a[it].metrics.get(ELAPSED_MS),
                      "elapsed_ms_b": b[it].metrics.get(ELAPSED_MS)}
                     for it in common]
    return {"rtol": rtol, "skip_first": skip_first, "iterations_compared": len(common),
            "missing_in_a": missing_in_a, "missing_in_b": missing_in_b,
            "repeated_in_a": repeated_a, "repeated_in_b": repeated_b,
            "losses": losses, "within_rtol": within, "iteration_time": time,
            "ok": within and not missing_in_a and not missing_in_b,
            "per_iteration": per_iteration}


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.6E}"


def report_text(result: dict) -> str:
    names = list(result["losses"])
    headers = ["iteration"]
    for n in names:
        headers += [f"{n} A", f"{n} B", "rel diff"]
    rows = []
    for row in result["per_iteration"]:
        cells = [row["iteration"]]
        for n in names:
            va, vb = row["a"].get(n), row["b"].get(n)
            d = rel_diff(va, vb) if va is not None and vb is not None else None
            cells += [_fmt(va), _fmt(vb), "-" if d is None else f"{d:.1e}"]
        rows.append(cells)
    out = [format_table(headers, rows), ""]
    for n, v in result["losses"].items():
        d = "inf" if v["max_rel_diff"] is None else format(v["max_rel_diff"], ".2e")
        worst = ("none compared" if v["at_iteration"] is None
                 else f"max rel diff {d} at iteration {v['at_iteration']}")
        extra = "".join(f", only in {side.upper()} at {v['only_in_' + side]}"
                        for side in ("a", "b") if v["only_in_" + side])
        out.append(f"{n}: {worst}{extra}: "
                   f"{'within' if v['within_rtol'] else 'BEYOND'} rtol {result['rtol']:g}")
    for side in ("a", "b"):
        if result["missing_in_" + side]:
            out.append(f"iterations missing in {side.upper()}: {result['missing_in_' + side]}")
        if result["repeated_in_" + side]:
            out.append(f"iterations printed twice in {side.upper()} (the later line counts): "
                       f"{result['repeated_in_' + side]}")
    t = result["iteration_time"]
    if t["iterations"]:
        ratio = "-" if t["ratio_b_over_a"] is None else f"{t['ratio_b_over_a']:.3f}"
        out.append(f"iteration time, iterations {t['first']}-{t['last']} ({t['iterations']}): "
                   f"A {t['mean_ms_a']:.1f} ms, B {t['mean_ms_b']:.1f} ms, B/A {ratio}")
    else:
        out.append(f"iteration time: no iteration after the first {result['skip_first']} "
                   f"is in both logs")
    out.append("PASS" if result["ok"] else "FAIL")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_a", metavar="LOG_A", help="reference run's log (stock Megatron-LM)")
    parser.add_argument("log_b", metavar="LOG_B", help="the run compared to it")
    parser.add_argument("--rtol", type=float, default=1e-3,
                        help="largest relative difference of a loss allowed (default 1e-3)")
    parser.add_argument("--skip-first", type=int, default=2, metavar="K",
                        help="iterations left out of the mean iteration time (default 2)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args(argv)
    try:
        if args.rtol < 0 or args.skip_first < 0:
            raise FoldingError("--rtol and --skip-first must not be negative")
        result = compare(load(args.log_a), load(args.log_b), args.rtol, args.skip_first)
    except FoldingError as e:
        print(f"error: {e}", file=sys.stderr)
        print(json.dumps({"ok": False, "error": str(e)}))
        return 2
    result = {"log_a": args.log_a, "log_b": args.log_b, **result}
    if not args.json:
        print(report_text(result))
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
