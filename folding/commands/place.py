"""``folding place``: place experts on EP ranks from a routing trace, next to the baselines."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Dict, Optional

from folding.commands.common import add_json_argument, emit_json, format_table
from folding.errors import FoldingError

SOLVERS = ("folding", "contiguous", "eplb", "exflow")
COLUMNS = (("balance", "B"), ("d_gpu", "D_gpu"), ("d_node", "D_node"), ("x_gpu", "X_gpu"),
           ("x_node", "X_node"), ("solve_seconds", "time [s]"), ("moved", "moved"))


def register(sub) -> None:
    p = sub.add_parser("place", help="place experts on EP ranks from a routing trace",
                       description="Fit an expert placement on a routing trace and print its metrics "
                                   "next to the contiguous, EPLB-style and ExFlow-style baselines; or "
                                   "score an existing placement with --eval.")
    p.add_argument("--trace", required=True, metavar="FILE", help="routing trace (.npz) to fit on")
    p.add_argument("--eval", metavar="PLACEMENT", help="score this placement file instead of solving")
    p.add_argument("--ep-size", type=int, help="expert-parallel ranks")
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node")
    p.add_argument("--redundant", type=int, default=0, help="spare expert slots per rank for replicas")
    p.add_argument("--objective", choices=("training", "inference"), default="training",
                   help="training: fewest nodes then ranks per token; inference: fewest layer-to-layer hops")
    p.add_argument("--solver", choices=SOLVERS, default="folding", help="placement written to --out")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds for the folding solver")
    p.add_argument("--workers", type=int, default=None,
                   help="processes placing training layers side by side (default: every core on "
                        "large instances, else 1)")
    p.add_argument("--previous", metavar="PLACEMENT",
                   help="placement in use: re-solve moving at most --max-moved of the slots")
    p.add_argument("--max-moved", type=float, default=0.1, help="share of slots --previous may move")
    p.add_argument("--balance-slack", type=float, default=None,
                   help="relative rise of the expected peak load allowed over balanced packing")
    p.add_argument("--score-trace", metavar="FILE", help="compute the metrics on this trace instead")
    p.add_argument("--certify", action="store_true",
                   help="also solve the exact MILP (small instances, no replicas) and report the gap")
    p.add_argument("--out", metavar="FILE", help="placement to write (JSON)")
    p.add_argument("--png", metavar="FILE", help="draw per-rank load and the ordered co-activation matrix")
    add_json_argument(p)
    p.set_defaults(handler=run)


def check_arguments(args: argparse.Namespace) -> None:
    if args.eval:
        return
    if args.ep_size is None or args.out is None:
        raise FoldingError("--ep-size and --out are required (or give --eval PLACEMENT)")
    if args.time_limit <= 0 or not math.isfinite(args.time_limit):
        raise FoldingError(f"--time-limit must be positive, not {args.time_limit}")
    if args.workers is not None and args.workers < 1:
        raise FoldingError(f"--workers must be at least 1, not {args.workers}")
    if not 0.0 <= args.max_moved <= 1.0:
        raise FoldingError(f"--max-moved must lie in [0, 1], not {args.max_moved}")
    if args.balance_slack is not None and args.balance_slack < 0:
        raise FoldingError(f"--balance-slack must be >= 0, not {args.balance_slack}")
    if args.redundant and args.solver in ("contiguous", "exflow"):
        raise FoldingError(f"--solver {args.solver} places no replicas: use --redundant 0")


def metrics_table(metrics: Dict[str, dict], chosen: Optional[str]) -> str:
    rows = []
    for name, values in metrics.items():
        cells = [("* " if name == chosen else "  ") + name]
        for key, _ in COLUMNS:
            value = values.get(key)
            cells.append("-" if value is None else f"{value:.2f}" if key == "solve_seconds" else f"{value:.4f}")
        rows.append(cells)
    return format_table(["solver"] + [label for _, label in COLUMNS], rows)


def run(args: argparse.Namespace) -> int:
    from folding.placement.trace import load_trace

    check_arguments(args)
    trace = load_trace(args.trace)
    score = load_trace(args.score_trace) if args.score_trace else trace
    if score.num_experts != trace.num_experts or score.num_layers != trace.num_layers:
        raise FoldingError(f"--score-trace has {score.num_experts} experts x {score.num_layers} layers, "
                           f"the trace {trace.num_experts} x {trace.num_layers}")
    if args.eval:
        return run_eval(args, trace if not args.score_trace else score)
    return run_solve(args, trace, score)


def run_eval(args: argparse.Namespace, trace) -> int:
    from folding.placement.baselines import contiguous
    from folding.placement.metrics import evaluate
    from folding.placement.placement import Placement

    placement = Placement.load(args.eval)
    metrics = {"placement": evaluate(placement, trace).as_dict()}
    reference = contiguous(trace, placement.ep_size, placement.gpus_per_node).placement
    metrics["contiguous"] = evaluate(reference, trace).as_dict()
    if args.png:
        from folding.placement.plot import draw_placement

        draw_placement(placement, trace, args.png, "placement", reference)
    if args.json:
        emit_json({"placement": args.eval, "ep_size": placement.ep_size,
                   "gpus_per_node": placement.gpus_per_node,
                   "redundant": placement.redundant_slots, "metrics": metrics})
    else:
        print(f"{args.eval} on {args.trace}: {placement.num_experts} experts x {placement.num_layers} "
              f"layers, EP {placement.ep_size}, {placement.slots_per_rank} slots per rank\n")
        print(metrics_table(metrics, "placement"))
        if args.png:
            print(f"\nwrote {args.png}")
    return 0


def run_solve(args: argparse.Namespace, trace, score) -> int:
    from folding.placement.baselines import run_baseline
    from folding.placement.metrics import evaluate
    from folding.placement.placement import Placement
    from folding.placement.problem import DEFAULT_BALANCE_SLACK
    from folding.placement.solver import solve

    progress = sys.stderr.isatty()
    slack = DEFAULT_BALANCE_SLACK if args.balance_slack is None else args.balance_slack
    previous = Placement.load(args.previous) if args.previous else None
    results = {"folding": solve(trace, args.ep_size, args.gpus_per_node, args.objective, args.redundant,
                                args.time_limit, previous, args.max_moved, slack, progress=progress,
                                workers=args.workers)}
    for name in SOLVERS[1:]:
        results[name] = run_baseline(name, trace, args.ep_size, args.gpus_per_node,
                                     args.redundant if name == "eplb" else 0, args.time_limit, progress)
    scored = {name: evaluate(r.placement, score, r.seconds, previous) for name, r in results.items()}
    metrics = {name: m.as_dict() for name, m in scored.items()}
    chosen = results[args.solver].placement
    try:
        chosen.save(args.out)
    except OSError as e:
        raise FoldingError(f"cannot write {args.out}: {e.strerror or e}") from None
    certificate = certify(args, trace, slack, progress) if args.certify else None
    if args.png:
        from folding.placement.plot import draw_placement

        draw_placement(chosen, score, args.png, args.solver, results["contiguous"].placement)
    if args.json:
        out = {"objective": args.objective, "solver": args.solver, "ep_size": args.ep_size,
               "gpus_per_node": args.gpus_per_node, "redundant": args.redundant, "out": args.out,
               "cost": {name: finite_or_none(m.cost(args.objective)) for name, m in scored.items()},
               "metrics": metrics}
        if certificate is not None:
            out["certificate"] = certificate
        emit_json(out)
        return 0
    print(f"{trace.num_experts} experts x {trace.num_layers} layers x {trace.num_tokens} tokens (top-{trace.top_k}) "
          f"on EP {args.ep_size} ({args.gpus_per_node} per node), {args.redundant} redundant slot(s) per rank, "
          f"objective {args.objective}\n")
    print(metrics_table(metrics, args.solver))
    if certificate is not None:
        best = certificate["milp_cost"]
        print(f"\nexact MILP: cost {'none found' if best is None else f'{best:.4f}'}, "
              f"lower bound {certificate['milp_bound']:.4f} "
              f"({'optimal' if certificate['milp_optimal'] else 'time limit reached'}, "
              f"{certificate['milp_seconds']:.1f} s)")
        if certificate["chain_bound"] is not None:
            print(f"chain bound: {certificate['chain_bound']:.4f} ({certificate['chain_seconds']:.1f} s; its "
                  f"placement costs {certificate['chain_placement_cost']:.4f})")
        print(f"folding solver (same balance rule) {certificate['folding_cost']:.4f}: "
              f"{100 * certificate['folding_above_bound']:.2f}% above the best bound {certificate['bound']:.4f}")
    print(f"\nwrote {args.out}" + (f" and {args.png}" if args.png else ""))
    return 0


def finite_or_none(value: float) -> Optional[float]:
    return None if math.isnan(value) else value


def certify(args: argparse.Namespace, trace, slack: float, progress: bool) -> dict:
    """The MILP optimum next to the folding solver run with the MILP's balance rule; for the
    inference objective on instances small enough, the chain bound too (the larger bound counts)."""
    from folding.placement.chain_bound import applicable, inference_chain_bound
    from folding.placement.metrics import evaluate
    from folding.placement.milp import solve_milp
    from folding.placement.solver import solve

    exact = solve_milp(trace, args.ep_size, args.gpus_per_node, args.objective, args.redundant, slack,
                       args.time_limit)
    same_rule = solve(trace, args.ep_size, args.gpus_per_node, args.objective, args.redundant,
                      args.time_limit, balance_slack=slack, sampling_noise=False)
    folding_cost = evaluate(same_rule.placement, trace).cost(args.objective)
    out = {"milp_cost": finite_or_none(exact.cost), "milp_bound": exact.bound, "milp_optimal": exact.optimal,
           "milp_seconds": exact.seconds, "folding_cost": folding_cost, "chain_bound": None,
           "chain_placement_cost": None, "chain_seconds": None}
    bound = exact.bound
    if args.objective == "inference" and not args.redundant and applicable(trace.num_experts, args.ep_size,
                                                                           args.gpus_per_node):
        chain = inference_chain_bound(trace, args.ep_size, args.gpus_per_node, slack, progress=progress)
        out.update(chain_bound=chain.bound, chain_placement_cost=chain.placement_cost, chain_seconds=chain.seconds)
        bound = max(bound, chain.bound)
    out.update(bound=bound, folding_above_bound=(folding_cost - bound) / bound if bound > 0 else 0.0)
    return out
