"""``folding megatron``: Megatron-LM's own training script with the plugin in it, no patch needed."""

from __future__ import annotations

import argparse
import sys

from folding.commands.common import emit_json


def register(sub) -> None:
    p = sub.add_parser(
        "megatron", help="run a Megatron-LM training script (pretrain_gpt.py) with the plugin",
        description="Run an unmodified Megatron-LM training script with the --folding-* flags "
                    "added to Megatron's parser and every MoE layer folded where the script builds "
                    "its GPTModel. Started per rank by torchrun or srun (env:// rendezvous): "
                    "`torchrun --nproc-per-node 8 --no-python folding megatron -- pretrain_gpt.py "
                    "ARGS`; or with --nproc N it starts N local ranks itself and stops them all, "
                    "naming the rank, when one fails. A bad folding or a flag the folded "
                    "dispatcher cannot train with is refused in one line, exit status 2, before "
                    "any rank trains. With --folding-replace-interval N the experts are "
                    "re-placed every N steps from live routing statistics and moved between two "
                    "steps with their optimizer state (docs/commands.md).",
        usage="folding megatron [--cpu] [--nproc N] [--json] -- SCRIPT [SCRIPT ARGS ...]")
    p.add_argument("--cpu", action="store_true",
                   help="train on CPU with gloo: the CPU runtime on, and Megatron's CPU flags "
                        "(--distributed-backend gloo, --transformer-impl local, no CUDA fusions) "
                        "added unless given")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="start N local ranks (default: this process is one rank of torchrun/srun)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="with --nproc: stop every rank after S seconds")
    p.add_argument("--json", action="store_true",
                   help="with --nproc: ranks' output hidden, one JSON object at the end (exit "
                        "status, failed rank, what the plugin reported, Megatron's metrics per "
                        "iteration)")
    p.add_argument("--log", metavar="FILE", default=None,
                   help="with --nproc: also write every rank's output to FILE (what `folding mfu` "
                        "and tools/compare_runs.py read)")
    p.add_argument("script", metavar="SCRIPT", help="the training script, e.g. pretrain_gpt.py")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the script's arguments, --folding-* flags included")
    p.set_defaults(handler=run)


def run(args) -> int:
    from folding.errors import FoldingError
    from folding.megatron import launcher

    script_args = list(args.script_args)
    if script_args[:1] == ["--"]:
        script_args = script_args[1:]
    if args.nproc is None:
        if args.json or args.timeout is not None or args.log:
            raise FoldingError("--json, --log and --timeout need --nproc (one rank cannot see the "
                               "others)")
        return launcher.run_rank(args.script, script_args, cpu=args.cpu)
    run = launcher.launch_local(args.script, script_args, args.nproc, cpu=args.cpu,
                                echo=not args.json, timeout_s=args.timeout)
    if args.log:
        with open(args.log, "w") as log:
            log.writelines(run.output)
    if args.json:
        from folding.cost.mfu_log import iteration_metrics

        emit_json({"world_size": run.world_size, "exit_status": run.exit_status,
                   "failed_rank": run.failed_rank, "reason": run.reason,
                   "plugin": [line.strip() for line in run.output
                              if line.startswith("> folding:")],
                   "iterations": [{"iteration": line.iteration, **line.metrics}
                                  for line in iteration_metrics("".join(run.output))]})
    if run.failed_rank is not None:
        print(f"folding megatron: error: {run.message()}", file=sys.stderr)
    return run.exit_status
