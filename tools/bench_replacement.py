"""What re-placement during training saves: cross-node bytes per step of tiny-moe-32e.

Three runs of the same recipe and steps (the folded dispatcher's outputs do not depend on the
placement, so the routing is the same in all three up to rounding):

1. with ``--replace-interval`` (the live statistics and the switch between steps), recording a
   routing trace of the whole run;
2. with the offline placement ``folding place`` fits on that trace (training objective);
3. with Megatron's contiguous layout.

For each, the dispatcher's cross-node bytes per step (``traffic``: bytes_remote over all MoE
layers), averaged over the last ``--window`` steps. Also, on the recorded trace, what the
offline placement is predicted to send across nodes against the contiguous layout, under the
dispatcher's node-level deduplication (a token's rows go once to each remote node hosting one
of its experts; ``live.rows_per_step``) and as D_gpu (per-rank deduplication): the routing's
own limit for a placement fitted once on the whole run.

The trace holds every token of the run, so the re-placement run can also be replayed on it
(``live.replay``: the same decisions, step by step, on the recorded routing) at --interval
and ten intervals around it: one attempt's outcome moves with small changes of its statistics, and the
replays show how much. Last, fresh solves on the steps before the last switch that lands
before the window (``past_fits``) show what any placement fitted on the past alone reaches
there, moves free: the router drifts, so this is the causal limit that re-placement is judged
against, where the offline placement has also seen the window. Prints a table, then one JSON
line; with ``--plot`` also draws
cross-node bytes per step of the three runs, switches marked.

    python tools/bench_replacement.py            # 200 steps, about 3 minutes per run on 2 cores
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train(*argv) -> dict:
    proc = subprocess.run([sys.executable, "-m", "folding", "train", *argv, "--traffic", "--json"],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout)


def cross_node_series(run: dict) -> list:
    """Cross-node bytes of every step, over all MoE layers."""
    return [sum(layer["bytes_remote"] for layer in step.values()) for step in run["traffic"]]


def cross_node_per_step(run: dict, window: int) -> float:
    steps = cross_node_series(run)[-window:]
    return sum(steps) / len(steps)


def plot(path: Path, runs: dict, switches: list, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4))
    for name, series in runs.items():
        axes.plot(range(1, len(series) + 1), [b / 1e6 for b in series], label=name, linewidth=1)
    for i, step in enumerate(switches):
        axes.axvline(step, color="grey", linewidth=0.6, linestyle=":",
                     label="re-placement applied" if i == 0 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("cross-node bytes per step (MB)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def per_step_statistics(trace, steps: int, streams: int) -> list:
    """One ``RoutingStatistics`` per step of a trace holding every token of the run: the
    recorder writes each token stream (a DP x TP x CP position) whole, in step order."""
    import numpy as np

    from folding.placement.live import RoutingStatistics

    per = trace.num_tokens // (steps * streams)
    if per * steps * streams != trace.num_tokens:
        sys.exit(f"the trace holds {trace.num_tokens} tokens, not {streams} streams x {steps} "
                 "steps of whole micro-batches")
    step_of = (np.arange(trace.num_tokens) % (steps * per)) // per
    return [RoutingStatistics.of_trace(trace.tokens(np.flatnonzero(step_of == s)))
            for s in range(steps)]


def replayed(args, recipe, trace, live: dict, offline, identity) -> tuple:
    """The live run's decisions replayed on its own trace, at several intervals, and the
    placements fitted on the past (``past_fits``), both against the offline placement."""
    from folding.placement.live import MoveCosts, replay, rows_per_step

    moved = [a for a in live["replacements"] if a["slots_moved"]]
    if not moved:
        return [], []
    spec = recipe.folding
    steps = per_step_statistics(trace, args.steps, spec.world_size // spec.pp)
    # What the run itself charged per slot (every EP group's copy) and per row.
    costs = MoveCosts(expert_bytes=moved[0]["bytes_moved"] // moved[0]["slots_moved"],
                      row_bytes=recipe.model.hidden_size * 4)
    last = slice(args.steps - args.window, args.steps)

    def tail(placement):
        return sum(rows_per_step(placement, s, node_dedup=True)["cross_node"]
                   for s in steps[last]) / args.window

    base, best = tail(identity), tail(offline)
    intervals = args.replays if args.replays is not None else sorted(
        {i for i in range(args.interval - 14, args.interval + 14, 3) if i > 0} | {args.interval})
    delays = [a["applied_at"] - a["step"] for a in live["replacements"] if a["applied"]]
    delay = max(delays) if delays else 1
    rows, in_force = [], None
    for interval in intervals:
        series, attempts, placed = replay(steps, identity, interval, args.max_moved, costs, delay,
                                          node_dedup=True)
        if interval == args.interval:
            in_force = placed
        value = sum(series[last]) / args.window
        rows.append({"interval": interval, "applied": sum(a.applied for a in attempts),
                     "vs_offline": float(value / best), "vs_contiguous": float(value / base)})
    if in_force is None:
        _, _, in_force = replay(steps, identity, args.interval, args.max_moved, costs, delay,
                                node_dedup=True)
    fits = [{"steps": f"{f['first']}-{f['last']}", "vs_offline": float(f["predicted"] / best),
             "vs_contiguous": float(f["predicted"] / base), "slots": f["slots"],
             "across_nodes": f["across_nodes"], "payback_steps": float(f["payback_steps"])}
            for f in past_fits(args, steps, identity, tail, delay, in_force, costs)]
    return rows, fits


def past_fits(args, steps: list, identity, tail, delay: int, placed: list, costs) -> list:
    """What a placement fitted on the past alone reaches over the last window, moves free: a
    fresh training solve (best of three seeds on the steps it is fitted on,
    ``live.fresh_solve``) on steps a..t, t the last attempt whose switch lands before the
    window, a going back one interval at a time. No
    policy that moves experts on what it has seen can beat the best of these by much; the
    offline placement has also seen the window itself. Also what switching to it would have
    cost from the replayed placement in force then (``placed``, one per step): slots, those
    copied across nodes, and the steps its saving over the window takes to pay those bytes
    back (the verdict's measure), against the interval that the verdict allows."""
    from folding.placement.live import (PASSES_PER_STEP, RoutingStatistics, changed_slots,
                                        copies_across, fresh_solve, relabelled_to,
                                        rows_per_step)

    last = (args.steps - args.window - delay) // args.interval * args.interval
    current = placed[last + delay]
    rows = []
    for first in range(last - args.interval + 1, 0, -args.interval):
        window = functools.reduce(RoutingStatistics.added, steps[first - 1:last])
        # The seed is picked on the steps it was fitted on: picking it on the last window would
        # let the future choose.
        found = min((fresh_solve(window, identity, seed) for seed in range(3)),
                    key=lambda p: rows_per_step(p, window, node_dedup=True)["cross_node"])
        target = relabelled_to(current, found)
        across = copies_across(current, target, "node")
        saving = (tail(current) - tail(target)) * PASSES_PER_STEP * costs.row_bytes
        rows.append({"first": first, "last": last, "placement": found, "predicted": tail(found),
                     "slots": changed_slots(current, target), "across_nodes": across,
                     "payback_steps": across * costs.expert_bytes * costs.copies / saving
                     if saving > 0 else float("inf")})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny-moe-32e")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--interval", type=int, default=40)
    parser.add_argument("--max-moved", type=float, default=0.5)
    parser.add_argument("--replays", type=int, nargs="*", default=None, metavar="INTERVAL",
                        help="intervals to replay the decisions at on the recorded trace "
                             "(default: --interval and ten, 3 steps apart, from --interval - 14)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="write cross-node bytes per step of the three runs (png)")
    args = parser.parse_args()

    from folding.placement.live import RoutingStatistics, rows_per_step
    from folding.placement.metrics import evaluate
    from folding.placement.placement import Placement
    from folding.placement.solver import solve
    from folding.placement.trace import load_trace
    from folding.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    spec = recipe.folding
    tokens_per_step = recipe.training.global_batch_size * recipe.training.seq_length
    with tempfile.TemporaryDirectory() as tmp:
        trace_path, offline_path = Path(tmp) / "trace.npz", Path(tmp) / "offline.json"
        common = ["--recipe", args.recipe, "--steps", str(args.steps)]
        live = train(*common, "--replace-interval", str(args.interval), "--replace-max-moved",
                     str(args.max_moved), "--trace-out", str(trace_path),
                     "--trace-tokens", str(tokens_per_step * args.steps))
        trace = load_trace(trace_path)
        offline = solve(trace, spec.ep, spec.gpus_per_node, "training").placement
        offline.save(offline_path)
        fixed = train(*common, "--placement", str(offline_path))
        contiguous = train(*common)
    identity = Placement.identity(recipe.model.num_experts, trace.num_layers, spec.ep,
                                  spec.gpus_per_node)
    d_offline, d_identity = evaluate(offline, trace).d_gpu, evaluate(identity, trace).d_gpu
    stats = RoutingStatistics.of_trace(trace)
    node_offline = rows_per_step(offline, stats, node_dedup=True)["cross_node"]
    node_identity = rows_per_step(identity, stats, node_dedup=True)["cross_node"]
    replays, fits = replayed(args, recipe, trace, live, offline, identity)
    runs = {"re-placement": live, "offline": fixed, "contiguous": contiguous}
    rows = {name: cross_node_per_step(run, args.window) for name, run in runs.items()}
    base = rows["contiguous"]
    print(f"{args.recipe}, {args.steps} steps, cross-node bytes per step over the last "
          f"{args.window} (folded dispatcher counters)")
    print(f"{'placement':<14} {'bytes/step':>12} {'x contiguous':>13}")
    for name, value in rows.items():
        print(f"{name:<14} {value:>12,.0f} {value / base:>13.3f}")
    attempts = live["replacements"]
    applied = sum(a["applied"] for a in attempts)
    print(f"re-placement attempts: {len(attempts)}, applied {applied}, skipped "
          f"{len(attempts) - applied}; re-placement / offline "
          f"{rows['re-placement'] / rows['offline']:.3f}")
    print(f"on the recorded trace ({trace.num_tokens} tokens), offline / contiguous: predicted "
          f"cross-node rows under node deduplication {node_offline / node_identity:.3f}, "
          f"D_gpu {d_offline:.4f} / {d_identity:.4f} = {d_offline / d_identity:.3f}")
    if replays:
        print(f"replayed on the recorded trace (predicted cross-node rows over the last "
              f"{args.window} steps, node-level deduplication):")
        print(f"{'interval':>8} {'applied':>8} {'x offline':>10} {'x contiguous':>13}")
        for row in replays:
            print(f"{row['interval']:>8} {row['applied']:>8} {row['vs_offline']:>10.3f} "
                  f"{row['vs_contiguous']:>13.3f}")
        ratios = sorted(row["vs_offline"] for row in replays)
        print(f"x offline over {len(ratios)} intervals: median {ratios[len(ratios) // 2]:.3f}, "
              f"range {ratios[0]:.3f}-{ratios[-1]:.3f}")
    if fits:
        print("fitted on the past alone, moves free (fresh solve, best of 3 seeds on its own "
              f"steps; predicted cross-node rows over the last {args.window} steps), and "
              f"switching to it from the replayed placement at interval {args.interval}: slots "
              "moved, those copied across nodes, steps to pay those back:")
        print(f"{'steps':>8} {'x offline':>10} {'x contiguous':>13} {'slots':>6} "
              f"{'across':>7} {'payback':>8}")
        for row in fits:
            print(f"{row['steps']:>8} {row['vs_offline']:>10.3f} {row['vs_contiguous']:>13.3f} "
                  f"{row['slots']:>6} {row['across_nodes']:>7} {row['payback_steps']:>8.0f}")
    if args.plot is not None:
        switches = [a["applied_at"] for a in attempts if a["applied"]]
        plot(args.plot, {name: cross_node_series(run) for name, run in runs.items()}, switches,
             f"{args.recipe}: re-placement every {args.interval} steps (at most "
             f"{args.max_moved:.0%} of the slots), offline placement, contiguous layout")
        print(f"wrote {args.plot}")
    print(json.dumps({"recipe": args.recipe, "steps": args.steps, "window": args.window,
                      "interval": args.interval, "max_moved": args.max_moved,
                      "cross_node_bytes_per_step": rows,
                      "replacement_vs_offline": rows["re-placement"] / rows["offline"],
                      "replacement_vs_contiguous": rows["re-placement"] / base,
                      "offline_vs_contiguous": rows["offline"] / base,
                      "trace_node_dedup_offline_vs_contiguous": node_offline / node_identity,
                      "trace_d_gpu": {"offline": d_offline, "contiguous": d_identity},
                      "attempts": len(attempts), "applied": applied, "replays": replays,
                      "past_fits": fits,
                      "replacements": attempts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
