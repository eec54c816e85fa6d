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
own limit for a placement fitted once on the whole run. Prints a table, then one JSON line;
with ``--plot`` also draws cross-node bytes per step of the three runs, switches marked.

    python tools/bench_replacement.py            # 200 steps, 4 to 6 minutes per run on 2 cores
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny-moe-32e")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--interval", type=int, default=40)
    parser.add_argument("--max-moved", type=float, default=0.5)
    parser.add_argument("--trace-tokens", type=int, default=1 << 16)
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
    with tempfile.TemporaryDirectory() as tmp:
        trace_path, offline_path = Path(tmp) / "trace.npz", Path(tmp) / "offline.json"
        common = ["--recipe", args.recipe, "--steps", str(args.steps)]
        live = train(*common, "--replace-interval", str(args.interval), "--replace-max-moved",
                     str(args.max_moved), "--trace-out", str(trace_path),
                     "--trace-tokens", str(args.trace_tokens))
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
                      "attempts": len(attempts), "applied": applied,
                      "replacements": attempts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
