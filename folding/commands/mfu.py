"""``folding mfu``: TFLOP/s per GPU and MFU from a Megatron training log."""

from __future__ import annotations

import argparse

from folding.commands.common import add_json_argument, emit_json, format_table
from folding.cost.flops import CONVENTIONS
from folding.cost.hardware import PROFILES, get_profile
from folding.cost.mfu_log import MfuReport, parse_mfu, read_log
from folding.errors import FoldingError
from folding.recipe import load_recipe


def register(sub) -> None:
    p = sub.add_parser("mfu", help="TFLOP/s per GPU and MFU from a Megatron training log",
                       description="Read Megatron's 'elapsed time per iteration (ms)' lines, recompute "
                                   "TFLOP/s per GPU from the model's FLOPs and MFU against a peak, "
                                   "and flag lines where Megatron's printed throughput disagrees. "
                                   "The model, sequence length, batch and world size come from the "
                                   "argument dump Megatron prints at start-up, or from --recipe.")
    p.add_argument("log", help="Megatron training log (stdout of pretrain_gpt.py)")
    p.add_argument("--recipe", help="recipe name (recipes/<name>.yaml) or path; overrides the model "
                                    "of the log's argument dump (needed when the log has none)")
    p.add_argument("--peak-tflops", type=float,
                   help="peak TFLOP/s per GPU for MFU (default: the --gpu profile's dense BF16 peak)")
    p.add_argument("--gpu", default="h100-sxm", choices=sorted(PROFILES),
                   help="hardware profile whose peak is used when --peak-tflops is absent")
    p.add_argument("--world-size", type=int,
                   help="GPUs of the run (default: the log's 'using world size' or argument dump, "
                        "else the recipe's)")
    p.add_argument("--convention", default="megatron", choices=sorted(CONVENTIONS),
                   help="FLOPs convention (default megatron, which Megatron's printed figure uses)")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="relative difference beyond the printed rounding at which Megatron's "
                        "figure is flagged (default 0.01)")
    p.add_argument("--png", metavar="FILE", help="plot both throughputs and MFU per interval")
    add_json_argument(p)
    p.set_defaults(handler=run)


def plot(report: MfuReport, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [i.iteration for i in report.intervals]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(its, [i.tflops_per_gpu for i in report.intervals], "o-", label=f"recomputed ({report.convention})")
    printed = [(i.iteration, i.megatron_tflops_per_gpu) for i in report.intervals
               if i.megatron_tflops_per_gpu is not None]
    if printed:
        ax.plot(*zip(*printed), "s--", label="printed by Megatron")
    bad = [(i.iteration, i.megatron_tflops_per_gpu) for i in report.intervals if i.disagrees]
    if bad:
        ax.plot(*zip(*bad), "rx", markersize=12, label="disagrees")
    ax.set_xlabel("iteration")
    ax.set_ylabel("TFLOP/s per GPU")
    mfu_axis = ax.secondary_yaxis("right", functions=(lambda t: 100 * t / report.peak_tflops,
                                                      lambda m: m * report.peak_tflops / 100))
    mfu_axis.set_ylabel(f"MFU % of {report.peak_tflops:g} TFLOP/s")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe) if args.recipe else None
    peak = args.peak_tflops if args.peak_tflops is not None else get_profile(args.gpu).peak_tflops
    if peak <= 0 or (args.world_size is not None and args.world_size < 1) or args.tolerance < 0:
        raise FoldingError("--peak-tflops and --world-size must be positive, --tolerance not negative")
    report = parse_mfu(read_log(args.log), recipe, peak, args.world_size, args.convention,
                       args.tolerance)
    name = recipe.name if recipe else "model from the log's arguments"
    if args.png:
        plot(report, args.png, f"{name} on {report.world_size} GPUs")
    if args.json:
        emit_json({"recipe": recipe.name if recipe else None} | report.to_json())
        return 0
    rows = []
    for i in report.intervals:
        printed = "-" if i.megatron_tflops_per_gpu is None else f"{i.megatron_tflops_per_gpu:.1f}"
        rows.append([i.iteration, f"{i.elapsed_ms:.1f}", i.global_batch_size, f"{i.tflops_per_gpu:.1f}",
                     printed, f"{100 * i.mfu:.1f}", "DISAGREES" if i.disagrees else ""])
    if recipe is None:
        m = report.model
        experts = f", {m.num_experts} experts top-{m.moe_router_topk}" if m.num_experts else ""
        name += (f" ({m.num_layers} layers, hidden {m.hidden_size}{experts}, "
                 f"seq {report.seq_length})")
    print(f"{name}: world size {report.world_size} (from {report.world_size_source}), peak "
          f"{peak:g} TFLOP/s, FLOPs convention: {CONVENTIONS[report.convention]}\n")
    print(format_table(["iteration", "ms/iter", "batch", "TFLOP/s/GPU", "Megatron", "MFU %", ""], rows))
    s = report.summary()
    print(f"\nafter the first interval: median {s['median_tflops_per_gpu']:.1f} TFLOP/s/GPU, "
          f"MFU {100 * s['median_mfu']:.1f}%")
    if s["disagreements"]:
        print(f"{s['disagreements']} interval(s) where Megatron's printed throughput differs from "
              f"the FLOPs of the {report.model_from}'s model: check the world size, the model, or a Megatron "
              f"build that counts FLOPs differently")
    if args.png:
        print(f"wrote {args.png}")
    return 0
