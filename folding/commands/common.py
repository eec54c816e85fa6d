"""Arguments and output helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from folding.mesh import DEFAULT_ORDER, FoldingSpec


def add_folding_arguments(parser: argparse.ArgumentParser, world_size_default=None) -> None:
    """The folding flags: the same on every command that takes a folding."""
    g = parser.add_argument_group("folding")
    g.add_argument("--world-size", type=int, default=world_size_default, help="number of ranks")
    g.add_argument("--tp", type=int, default=1, help="attention tensor parallel size")
    g.add_argument("--cp", type=int, default=1, help="attention context parallel size")
    g.add_argument("--cp-comm-type", default=None, metavar="TYPE",
                   help="context-parallel attention exchange: p2p (default), all_gather or a2a")
    g.add_argument("--dp", type=int, help="attention data parallel size (derived if left out)")
    g.add_argument("--pp", type=int, default=1, help="pipeline parallel size (shared)")
    g.add_argument("--vpp", type=int, help="virtual pipeline stages per rank")
    g.add_argument("--etp", type=int, help="expert tensor parallel size (default: TP)")
    g.add_argument("--ep", type=int, default=1, help="expert parallel size")
    g.add_argument("--edp", type=int, help="expert data parallel size (derived if left out)")
    g.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node")
    g.add_argument("--num-experts", type=int, help="experts per MoE layer (checks EP)")
    g.add_argument("--order", default=DEFAULT_ORDER, help="Megatron rank order, fastest first")


def folding_from_args(args: argparse.Namespace, **model) -> FoldingSpec:
    """Build and validate the folding named by ``add_folding_arguments`` flags.

    ``model`` adds model facts (num_layers, num_attention_heads, ...) to check against.
    """
    if getattr(args, "num_experts", None) is not None:
        model.setdefault("num_experts", args.num_experts)
    return FoldingSpec(world_size=args.world_size, tp=args.tp, cp=args.cp, dp=args.dp,
                       pp=args.pp, vpp=args.vpp, etp=args.etp, ep=args.ep, edp=args.edp,
                       order=args.order, gpus_per_node=args.gpus_per_node,
                       cp_comm_type=getattr(args, "cp_comm_type", None) or "p2p", **model)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    from folding.run.device import DEVICES

    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the ranks run: cuda (one GPU per rank, NCCL), cpu (gloo) or "
                             "auto (cuda when there are as many GPUs as ranks, else cpu; the "
                             "default)")


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, sort_keys=False)
    sys.stdout.write("\n")


def format_table(headers, rows) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def traffic_text(traffic, gpus_per_node: int) -> str:
    """Per MoE layer, what the folded dispatcher moved in the last step, summed over ranks."""
    last = traffic[-1]
    rows = []
    for layer, t in sorted(last.items()):
        rows.append([layer, t["tokens_self"], t["tokens_node"], t["tokens_remote"],
                     f"{(t['bytes_node'] + t['bytes_remote']) / 1e6:.3f}",
                     f"{t['bytes_remote'] / 1e6:.3f}", t["pairs_dropped"],
                     t["max_pairs_per_rank"], f"{t['mean_pairs_per_rank']:.1f}"])
    table = format_table(["layer", "rows to self", "to same node", "to other nodes",
                          "MB across ranks", "MB across nodes", "pairs dropped",
                          "max pairs/rank", "mean pairs/rank"], rows)
    return (f"folded dispatcher traffic, last step ({len(traffic)} in all), {gpus_per_node} ranks "
            f"per node; a row is one token sent once to one rank:\n{table}")


def print_run(args, as_json: dict, text: str, traffic, gpus_per_node: int) -> None:
    """The result of a run: JSON, or text; with --traffic, the dispatcher's counters too."""
    if args.json:
        if not args.traffic:
            as_json = {k: v for k, v in as_json.items() if k != "traffic"}
        emit_json(as_json)
        return
    print(text)
    if args.traffic:
        print("\n" + traffic_text(traffic, gpus_per_node))


def require_folded_for_traffic(args, dispatcher: str) -> None:
    if args.traffic and dispatcher != "folded":
        from folding.errors import FoldingError

        raise FoldingError("--traffic counts what the folded dispatcher moves: add --dispatcher folded")
