"""What re-placement during training saves: cross-node bytes per step of tiny-moe-32e.

Three runs of the same recipe and steps (the folded dispatcher's outputs do not depend on the
placement, so the routing is the same in all three up to rounding):

1. with ``--replace-interval`` (the live statistics and the switch between steps), recording a
   routing trace of the whole run;
2. with the offline placement ``folding place`` fits on that trace (training objective);
3. with Megatron's contiguous layout.

For each, the dispatcher's cross-node bytes per step (``traffic``: bytes_remote over all MoE
layers), averaged over the last ``--window`` steps. Also, on the recorded trace, D_gpu of the
offline and contiguous placements: with a per-rank deduplicating dispatcher a token's
cross-node rows are proportional to D_gpu, so their ratio is what the best offline placement
can reach on this routing. Prints a table, then one JSON line.

    python tools/bench_replacement.py            # 200 steps, several minutes per run on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def train(*argv) -> dict:
    proc = subprocess.run([sys.executable, "-m", "folding", "train", *argv, "--traffic", "--json"],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout)


def cross_node_per_step(run: dict, window: int) -> float:
    steps = run["traffic"][-window:]
    return sum(sum(layer["bytes_remote"] for layer in step.values()) for step in steps) / len(steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="tiny-moe-32e")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--max-moved", type=float, default=0.1)
    parser.add_argument("--trace-tokens", type=int, default=1 << 16)
    args = parser.parse_args()

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
    rows = {name: cross_node_per_step(run, args.window)
            for name, run in (("re-placement", live), ("offline", fixed),
                              ("contiguous", contiguous))}
    base = rows["contiguous"]
    print(f"{args.recipe}, {args.steps} steps, cross-node bytes per step over the last "
          f"{args.window} (folded dispatcher counters)")
    print(f"{'placement':<14} {'bytes/step':>12} {'x contiguous':>13}")
    for name, value in rows.items():
        print(f"{name:<14} {value:>12,.0f} {value / base:>13.3f}")
    attempts = live["replacements"]
    applied = sum(a["applied"] for a in attempts)
    print(f"re-placement attempts: {len(attempts)}, applied {applied}")
    print(f"on the recorded trace ({trace.num_tokens} tokens): D_gpu offline {d_offline:.4f}, "
          f"contiguous {d_identity:.4f}, ratio {d_offline / d_identity:.3f}")
    print(json.dumps({"recipe": args.recipe, "steps": args.steps, "window": args.window,
                      "cross_node_bytes_per_step": rows,
                      "replacement_vs_offline": rows["re-placement"] / rows["offline"],
                      "replacement_vs_contiguous": rows["re-placement"] / base,
                      "offline_vs_contiguous": rows["offline"] / base,
                      "trace_d_gpu": {"offline": d_offline, "contiguous": d_identity},
                      "attempts": len(attempts), "applied": applied,
                      "replacements": attempts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
