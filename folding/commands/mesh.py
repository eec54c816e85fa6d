"""``folding mesh``: show and check a folded layout before launching it."""

from __future__ import annotations

import argparse

from folding.commands.common import (add_folding_arguments, add_json_argument, emit_json,
                                     folding_from_args, format_table)
from folding.mesh import FoldingSpec


def register(sub) -> None:
    p = sub.add_parser("mesh", help="print the attention and MoE meshes of a folding",
                       description="Print each rank's node and coordinates in the attention mesh "
                                   "(TP, CP, DP, PP) and the MoE mesh (ETP, EP, EDP, PP), then "
                                   "which groups cross node boundaries.")
    add_folding_arguments(p)
    add_json_argument(p)
    p.add_argument("--png", metavar="FILE", help="draw both meshes, one colour per EP group")
    p.set_defaults(handler=run)


def mesh_json(spec: FoldingSpec) -> dict:
    groups = spec.rank_groups()
    return {"attention": groups["attention"], "moe": groups["moe"], "nodes": spec.nodes}


def mesh_text(spec: FoldingSpec) -> str:
    rows = []
    for rank in range(spec.world_size):
        c = spec.coordinates(rank)
        a, m = c["attention"], c["moe"]
        rows.append([rank, spec.node_of(rank), a["tp"], a["cp"], a["dp"], a["pp"],
                     "|", m["etp"], m["ep"], m["edp"], m["pp"]])
    table = format_table(["rank", "node", "TP", "CP", "DP", "PP", "|", "ETP", "EP", "EDP", "PP"], rows)
    folded = "folded" if spec.is_folded() else "not folded (MoE layers reuse the attention mapping)"
    head = (f"world size {spec.world_size} on {spec.num_nodes} node(s) of {spec.gpus_per_node}: "
            f"{spec.describe()}  [{folded}]")
    report = "\n".join(f"  {span.mesh:9s} {span.message}" for span in spec.layout_report())
    return f"{head}\n\n{table}\n\nlayout report:\n{report}"


def run(args: argparse.Namespace) -> int:
    spec = folding_from_args(args)
    if args.png:
        from folding.mesh_plot import draw_meshes

        draw_meshes(spec, args.png)
    if args.json:
        emit_json(mesh_json(spec))
    else:
        print(mesh_text(spec))
        if args.png:
            print(f"\nwrote {args.png}")
    return 0
