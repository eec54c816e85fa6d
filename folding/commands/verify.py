"""``folding verify``: prove a folding trains exactly like a single process (CPU or GPUs)."""

from __future__ import annotations

import argparse

from folding.commands.common import (add_device_argument, add_folding_arguments, add_json_argument,
                                     folding_from_args, format_table, print_run,
                                     require_folded_for_traffic)
from folding.megatron.model import DISPATCHERS, MoERouting
from folding.run.verify import FAULTS, LOSS_TOLERANCE, TENSOR_TOLERANCE, VerifyCase, VerifyReport


def register(sub) -> None:
    p = sub.add_parser(
        "verify", help="check a folding against a single-process reference",
        description="Spawn the folding's ranks locally (CPU ranks with gloo, or one GPU per rank "
                    "with NCCL: --device), run N training steps of the "
                    "recipe's model from the same weights on the same batches as a single "
                    "process, and compare losses, every gradient and every updated parameter.")
    add_folding_arguments(p, world_size_default=8)
    p.add_argument("--recipe", default="tiny-moe", help="model recipe (default: tiny-moe)")
    p.add_argument("--steps", type=int, default=3, help="training steps to compare")
    p.add_argument("--dispatcher", choices=DISPATCHERS, default="alltoall")
    p.add_argument("--capacity-factor", type=float, help="token capacity per expert (default: dropless)")
    p.add_argument("--drop-policy", choices=("probs", "position"), default="probs")
    p.add_argument("--pad-to-capacity", action="store_true")
    p.add_argument("--node-dedup", choices=("auto", "on", "off"), default="auto",
                   help="folded dispatcher: send a token once per remote node, through one rank "
                        "there (auto: when the EP group spans several nodes)")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--micro-batches", type=int, default=2, help="micro-batches per DP rank per step")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--placement", metavar="FILE", help="expert placement (JSON) for --dispatcher folded")
    p.add_argument("--traffic", action="store_true", help="print what the folded dispatcher moved")
    p.add_argument("--inject-fault", choices=FAULTS, help="break the folded run on purpose, to see "
                                                          "the checker fail")
    add_device_argument(p)
    add_json_argument(p)
    p.set_defaults(handler=run)


def case_from_args(args: argparse.Namespace) -> VerifyCase:
    from folding.recipe import load_recipe

    model = load_recipe(args.recipe).model
    spec = folding_from_args(args, num_experts=model.num_experts, num_layers=model.num_layers,
                             num_attention_heads=model.num_attention_heads,
                             num_query_groups=model.query_groups)
    routing = MoERouting(dispatcher=args.dispatcher, capacity_factor=args.capacity_factor,
                         drop_policy=args.drop_policy, pad_to_capacity=args.pad_to_capacity,
                         node_dedup={"auto": None, "on": True, "off": False}[args.node_dedup])
    return VerifyCase(spec=spec, routing=routing, recipe=args.recipe, steps=args.steps,
                      seq_len=args.seq_len, micro_batches=args.micro_batches,
                      micro_batch_size=args.micro_batch_size, seed=args.seed,
                      fault=args.inject_fault, placement=args.placement)


def report_text(report: VerifyReport) -> str:
    rows = []
    for s in report.steps:
        grad_name, grad = s.worst_grad
        param_name, param = s.worst_param
        rows.append([s.step, f"{s.loss_reference:.6f}", f"{s.loss_folded:.6f}",
                     f"{s.loss_rel_diff:.1e}", f"{grad:.1e}", grad_name, f"{param:.1e}"])
    table = format_table(["step", "loss (reference)", "loss (folded)", "loss rel diff",
                          "max grad rel diff", "worst gradient", "max param rel diff"], rows)
    case = report.case
    routing = case.routing
    mode = ("dropless" if routing.capacity_factor is None else
            f"capacity factor {routing.capacity_factor}, drop {routing.drop_policy}"
            + (", padded" if routing.pad_to_capacity else ""))
    world = case.spec.world_size
    where = report.device.ranks(world) if report.device else f"{world} ranks"
    lines = [f"folding {case.spec.describe()} on {where}, "
             f"{routing.dispatcher} dispatcher, {mode}, recipe {case.recipe}"]
    if report.device:
        lines.append(f"device: {report.device.reason}")
    lines += ["", table, ""]
    if report.drops.compared:
        lines.append(f"token-dropping decisions: {report.drops.compared} compared, "
                     f"{report.drops.near_ties} near ties at the capacity boundary replayed, "
                     f"{len(report.drops.mismatches)} mismatches")
        lines += [f"  {m}" for m in report.drops.mismatches[:5]]
    verdict = "PASSED" if report.passed else "FAILED"
    lines.append(f"{verdict}: loss {report.max_loss_rel_diff:.1e} (<= {LOSS_TOLERANCE:.0e}), "
                 f"gradients {report.max_grad_rel_diff:.1e} and parameters "
                 f"{report.max_param_rel_diff:.1e} (<= {TENSOR_TOLERANCE:.0e}, ||a-b||/||b|| per tensor)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from folding.run.verify import verify

    case = case_from_args(args)
    require_folded_for_traffic(args, case.routing.dispatcher)
    report = verify(case, progress=True, device=args.device)
    print_run(args, report.to_json(), report_text(report), report.traffic, case.spec.gpus_per_node)
    return 0 if report.passed else 1
