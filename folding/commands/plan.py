"""``folding plan``: which folding of a recipe's model fits and should be fastest on N GPUs."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from folding.commands.common import add_json_argument, emit_json, format_table
from folding.cost.hardware import PROFILES, get_profile
from folding.cost.planner import RECOMPUTE_OPTIONS, plan, same_degrees
from folding.errors import FoldingError
from folding.megatron.flags import launch_environment, megatron_flags
from folding.recipe import load_recipe


def register(sub) -> None:
    p = sub.add_parser("plan", help="rank every legal folding of a recipe's model on N GPUs",
                       description="Enumerate every legal folding (TP, CP, DP, PP, VPP, ETP, EP, EDP, "
                                   "micro-batch size, recompute), drop those that do not fit in GPU "
                                   "memory, and rank the rest by predicted step time (roofline compute, "
                                   "alpha-beta communication, pipeline bubble).")
    p.add_argument("--recipe", required=True, help="recipe name (recipes/<name>.yaml) or path")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per NVLink node")
    p.add_argument("--gpu-mem-gb", type=float, required=True, help="memory per GPU in GB (10^9 bytes)")
    p.add_argument("--gpu", default="h100-sxm", choices=sorted(PROFILES),
                   help="hardware profile for rates and bandwidths (default h100-sxm)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the recipe's)")
    p.add_argument("--gbs", type=int, help="global batch size (default: the recipe's)")
    p.add_argument("--mbs", default="1,2,4", help="micro-batch sizes to try, comma-separated")
    p.add_argument("--recompute", default=",".join(RECOMPUTE_OPTIONS),
                   help="recompute options to try, comma-separated (none, selective, full)")
    p.add_argument("--max-cp", type=int, default=8, help="largest context-parallel size to try")
    p.add_argument("--cp-comm-types", default="p2p",
                   help="context-parallel exchanges to try with CP > 1, comma-separated among "
                        "p2p, all_gather and a2a (default: p2p)")
    p.add_argument("--top", type=int, default=10, help="foldings to list (default 10)")
    add_json_argument(p)
    p.set_defaults(handler=run)


def _ints(text: str, flag: str):
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FoldingError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise FoldingError(f"{flag} {text!r}: expected positive integers")
    return values


def _cp_comm_types(text: str):
    from folding.mesh import CP_COMM_TYPES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in CP_COMM_TYPES]
    if unknown or not modes:
        raise FoldingError(f"--cp-comm-types {text!r}: use {', '.join(CP_COMM_TYPES)}")
    return modes


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    if args.gpus < 1 or args.gpus_per_node < 1 or args.gpu_mem_gb <= 0 or args.top < 1:
        raise FoldingError("--gpus, --gpus-per-node, --gpu-mem-gb and --top must be positive")
    training = recipe.training
    if args.seq_len:
        training = dataclasses.replace(training, seq_length=args.seq_len)
    if args.gbs:
        training = dataclasses.replace(training, global_batch_size=args.gbs)
    recompute = tuple(r.strip() for r in args.recompute.split(",") if r.strip())
    unknown = [r for r in recompute if r not in RECOMPUTE_OPTIONS]
    if unknown or not recompute:
        raise FoldingError(f"--recompute {args.recompute!r}: use none, selective and/or full")
    hw = get_profile(args.gpu)
    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        progress = lambda items: tqdm(items, desc="costing foldings", unit="folding", file=sys.stderr)
    result = plan(recipe.model, training, hw, args.gpus, args.gpus_per_node, args.gpu_mem_gb,
                  micro_batch_sizes=_ints(args.mbs, "--mbs"), recompute=recompute,
                  max_cp=args.max_cp, progress=progress,
                  cp_comm_types=_cp_comm_types(args.cp_comm_types))
    ranked = result.foldings_ranked()
    if not ranked:
        raise FoldingError(f"no folding of {recipe.name} fits in {args.gpu_mem_gb:g} GB on "
                           f"{args.gpus} GPUs ({result.foldings} legal foldings, "
                           f"{result.evaluated} combinations tried)")
    best = ranked[0]
    flags = megatron_flags(recipe.model, training, best.spec, best.recompute, best.micro_batch_size)
    own = recipe.folding
    own_rank = None
    if own.world_size == args.gpus:
        own_rank = result.rank_of(lambda row: same_degrees(
            row.spec, tp=own.tp, cp=own.cp, pp=own.pp, vpp=own.vpp, etp=own.etp, ep=own.ep))
    if args.json:
        emit_json({"recipe": recipe.name, "gpu": hw.name, "gpus": args.gpus,
                   "gpus_per_node": args.gpus_per_node, "gpu_mem_gb": args.gpu_mem_gb,
                   "seq_length": training.seq_length, "global_batch_size": training.global_batch_size,
                   "legal_foldings": result.foldings, "combinations": result.evaluated,
                   "rejected_for_memory": result.rejected_memory,
                   "recipe_folding_rank": own_rank,
                   "ranked": [row.to_json() for row in ranked[:args.top]],
                   "best_flags": flags, "best_env": launch_environment(best.spec)})
        return 0
    rows = []
    for i, row in enumerate(ranked[:args.top], 1):
        s = row.spec
        cp = s.cp if s.cp == 1 else f"{s.cp} {s.cp_comm_type}"
        rows.append([i, s.tp, cp, s.dp, s.pp, s.vpp or 1, "|", s.etp, s.ep, s.edp,
                     row.micro_batch_size, row.recompute, f"{row.time.total:.3f}",
                     f"{row.time.tflops_per_gpu:.0f}", f"{100 * row.time.mfu:.1f}",
                     f"{row.memory_gb:.1f}"])
    print(f"{recipe.name} on {args.gpus} x {hw.name} ({args.gpus_per_node} per node, "
          f"{args.gpu_mem_gb:g} GB), sequence {training.seq_length}, global batch "
          f"{training.global_batch_size}: {result.foldings} legal foldings, {result.evaluated} "
          f"combinations, {result.rejected_memory} do not fit\n")
    print(format_table(["#", "TP", "CP", "DP", "PP", "VPP", "|", "ETP", "EP", "EDP", "MBS",
                        "recompute", "step s", "TFLOP/s/GPU", "MFU %", "mem GB"], rows))
    if own_rank is not None or own.world_size == args.gpus:
        where = f"ranks {own_rank}" if own_rank else "does not fit or is not legal here"
        print(f"\nthe recipe's folding ({own.describe()}) {where}")
    print("\npredicted step time: roofline compute and alpha-beta communication with the "
          f"{hw.name} profile's efficiency assumptions; MFU in Megatron's FLOPs convention.")
    print("\nMegatron flags of the best:")
    for k, v in launch_environment(best.spec).items():
        print(f"export {k}={v}")
    print("pretrain_gpt.py " + " ".join(flags))
    return 0
