"""``folding train``: the main job, a recipe trained on local ranks in a folded layout."""

from __future__ import annotations

import argparse

from folding.commands.common import (add_device_argument, add_json_argument, print_run,
                                     require_folded_for_traffic)
from folding.megatron.model import DISPATCHERS
from folding.mesh import CP_COMM_TYPES
from folding.run.train import TrainOptions, TrainSummary


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a recipe on local ranks (default: tiny-moe on 8 ranks)",
        description="Train a recipe's model with Megatron-Core on local ranks in its folded "
                    "layout (CPU ranks with gloo, or one GPU per rank with NCCL: --device), "
                    "on the byte-level corpus shipped with the package. The degree flags "
                    "replace the recipe's folding (DP and EDP are derived again); with --cp > 1 "
                    "each sequence is split over the CP ranks by Megatron's load-balanced "
                    "context-parallel split (see recipe tiny-moe-long).")
    p.add_argument("--recipe", default="tiny-moe", help="recipe name or YAML file")
    p.add_argument("--steps", type=int, help="steps to run now (default: the recipe's train_iters)")
    p.add_argument("--nproc", type=int, help="local ranks (default: the recipe's world size)")
    p.add_argument("--save", metavar="DIR", help="write a full-layout checkpoint at the end")
    p.add_argument("--load", metavar="DIR", help="resume from a checkpoint (any folding)")
    p.add_argument("--log-interval", type=int, help="steps between log lines")
    for degree in ("tp", "cp", "pp", "vpp", "etp", "ep"):
        p.add_argument(f"--{degree}", type=int, help=f"override the recipe's {degree.upper()}")
    p.add_argument("--cp-comm-type", choices=CP_COMM_TYPES,
                   help="override the recipe's context-parallel attention exchange (with --cp > 1; "
                        "the sequence length must divide by 2 x CP)")
    p.add_argument("--gpus-per-node", type=int, help="override the recipe's ranks per node")
    p.add_argument("--dispatcher", choices=DISPATCHERS, help="override the token dispatcher")
    p.add_argument("--placement", metavar="FILE", help="expert placement (JSON) for --dispatcher folded")
    p.add_argument("--traffic", action="store_true", help="print what the folded dispatcher moved")
    p.add_argument("--trace-out", metavar="FILE", help="write a routing trace (.npz) for folding place")
    p.add_argument("--trace-tokens", type=int, default=8192, help="tokens per MoE layer in the trace")
    g = p.add_argument_group("re-placement (with --dispatcher folded)")
    g.add_argument("--replace-interval", type=int, metavar="N",
                   help="every N steps, re-place the experts from live routing statistics and "
                        "move them between two steps (parameters and Adam state, exactly)")
    g.add_argument("--replace-max-moved", type=float, default=0.1, metavar="SHARE",
                   help="share of each layer's slots one re-placement may move (default 0.1)")
    g.add_argument("--replace-apply-after", type=int, metavar="STEPS",
                   help="switch exactly STEPS steps after the solve starts, waiting for it if "
                        "needed (repeatable runs; default: the first step after it is ready)")
    g.add_argument("--replace-time-limit", type=float, default=10.0, metavar="SECONDS",
                   help="time limit of each re-placement's solve (default 10)")
    g.add_argument("--replace-always", action="store_true",
                   help="apply every re-placement that moves a slot, even when its predicted "
                        "saving does not cover the bytes moved (to check that switching is exact)")
    add_device_argument(p)
    add_json_argument(p)
    p.set_defaults(handler=run)


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    folding = {k: getattr(args, k)
               for k in ("tp", "cp", "pp", "vpp", "etp", "ep", "gpus_per_node", "cp_comm_type")
               if getattr(args, k) is not None}
    routing = {"dispatcher": args.dispatcher} if args.dispatcher else {}
    return TrainOptions(recipe=args.recipe, steps=args.steps, nproc=args.nproc, folding=folding,
                        routing=routing, save=args.save, load=args.load,
                        log_interval=args.log_interval, placement=args.placement,
                        trace_out=args.trace_out, trace_tokens=args.trace_tokens,
                        device=args.device, replace_interval=args.replace_interval,
                        replace_max_moved=args.replace_max_moved,
                        replace_apply_after=args.replace_apply_after,
                        replace_time_limit=args.replace_time_limit,
                        replace_always=args.replace_always)


def summary_text(s: TrainSummary) -> str:
    last = s.first_step + len(s.losses)
    cp = s.degrees.get("cp", 1) if s.degrees else 1
    exchange = f", CP exchange {s.degrees['cp_comm_type']}" if cp > 1 else ""
    where = s.device.ranks(s.world_size) if s.device else f"{s.world_size} ranks"
    lines = [f"trained {s.recipe} for steps {s.first_step + 1}-{last} on {where}, "
             f"folding {s.folding}{exchange}",
             *([f"device: {s.device.reason}"] if s.device else []),
             f"loss {s.first_loss:.3f} -> {s.last_loss:.3f} nats/byte (first step -> mean of the "
             f"last {min(10, len(s.losses))})",
             f"wall time {s.wall_s:.0f} s ({s.train_s:.0f} s training), {s.tokens_per_s:,.0f} tokens/s"]
    if s.saved:
        lines.append(f"checkpoint written to {s.saved}")
    if s.trace:
        lines.append(f"routing trace of {s.traced_tokens} tokens per MoE layer written to {s.trace}")
    if s.replacements is not None:
        from folding.placement.live import Attempt

        lines += [Attempt(**a).line() for a in s.replacements]
        applied = sum(a["applied"] for a in s.replacements)
        lines.append(f"re-placements: {applied} applied, {len(s.replacements) - applied} skipped")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from folding.run.train import train

    options = options_from_args(args)
    require_folded_for_traffic(args, options.routing.get(
        "dispatcher", options.resolve().training.moe_token_dispatcher_type))
    summary = train(options)
    print_run(args, summary.to_json(), summary_text(summary), summary.traffic, summary.gpus_per_node)
    return 0
