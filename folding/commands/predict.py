"""``folding predict``: one folding's predicted step time, throughput, MFU and memory."""

from __future__ import annotations

import argparse
import dataclasses

from folding.commands.common import add_json_argument, emit_json, format_table
from folding.cost.calibration import FITTED
from folding.cost.hardware import PROFILES, get_profile
from folding.cost.planner import RECOMPUTE_OPTIONS
from folding.cost.predict import PRECISIONS, Predictor
from folding.errors import FoldingError
from folding.recipe import load_recipe


def register(sub) -> None:
    p = sub.add_parser("predict", help="predict one folding's step time, MFU and memory",
                       description="Predict one folding's step time, TFLOP/s per GPU, MFU and the "
                                   "busiest rank's memory with the calibrated step-time model "
                                   "that `folding plan` ranks with (docs/calibration.md). DP and "
                                   "EDP are derived from the GPU count.")
    p.add_argument("--recipe", required=True, help="recipe name (recipes/<name>.yaml) or path")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per NVLink node (default 8)")
    for flag, default, text in (("--tp", 1, "attention tensor parallel size"),
                                ("--cp", 1, "attention context parallel size"),
                                ("--pp", 1, "pipeline parallel size"),
                                ("--ep", 1, "expert parallel size")):
        p.add_argument(flag, type=int, default=default, help=f"{text} (default {default})")
    p.add_argument("--vpp", type=int, help="virtual pipeline stages per rank")
    p.add_argument("--etp", type=int, help="expert tensor parallel size (default: TP)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the recipe's)")
    p.add_argument("--gbs", type=int, help="global batch size (default: the recipe's)")
    p.add_argument("--mbs", type=int, help="micro-batch size (default: the recipe's)")
    p.add_argument("--recompute", help="none, selective or full (default: the recipe's)")
    p.add_argument("--gpu", default="h100-sxm",
                   help=f"hardware profile: {', '.join(sorted(PROFILES))} (default h100-sxm)")
    p.add_argument("--precision", help="bf16 or fp8 GEMMs (default: the recipe's)")
    p.add_argument("--ep-overlap", action="store_true",
                   help="the run overlaps the expert all-to-all with compute "
                        "(--overlap-moe-expert-parallel-comm)")
    p.add_argument("--force-balance", action="store_true",
                   help="the run forces balanced routing (--moe-router-force-load-balancing, "
                        "as benchmarks do): no routing imbalance is charged")
    add_json_argument(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    hw = get_profile(args.gpu)
    recipe = load_recipe(args.recipe)
    training = recipe.training
    for value, field in ((args.seq_len, "seq_length"), (args.gbs, "global_batch_size"),
                         (args.mbs, "micro_batch_size"), (args.recompute, "recompute"),
                         (args.precision, "precision")):
        if value is not None:
            training = dataclasses.replace(training, **{field: value})
    positive = {"--gpus": args.gpus, "--gpus-per-node": args.gpus_per_node, "--tp": args.tp,
                "--cp": args.cp, "--pp": args.pp, "--ep": args.ep, "--seq-len": training.seq_length,
                "--gbs": training.global_batch_size, "--mbs": training.micro_batch_size}
    bad = [f"{k} {v}" for k, v in positive.items() if v < 1]
    if bad:
        raise FoldingError(f"{', '.join(bad)}: must be positive")
    if training.recompute not in RECOMPUTE_OPTIONS:
        raise FoldingError(f"--recompute {training.recompute!r}: use none, selective or full")
    if training.precision not in PRECISIONS:
        raise FoldingError(f"--precision {training.precision!r}: use {' or '.join(PRECISIONS)}")
    predictor = Predictor(recipe.model, training, hw, ep_overlap=args.ep_overlap,
                          force_balance=args.force_balance)
    spec = predictor.spec(args.gpus, args.gpus_per_node, tp=args.tp, cp=args.cp, pp=args.pp,
                          vpp=args.vpp, ep=args.ep, etp=args.etp)
    result = predictor.predict(spec, training.micro_batch_size, training.recompute, FITTED)
    t, mem = result.time, result.memory
    parts = result.breakdown()
    fits = result.memory_gb <= hw.memory_gb - hw.reserved_gb
    if args.json:
        emit_json({"recipe": recipe.name, "gpu": hw.name, "gpus": args.gpus,
                   "gpus_per_node": args.gpus_per_node, "folding": spec.degrees(),
                   "describe": spec.describe(), "seq_length": training.seq_length,
                   "global_batch_size": training.global_batch_size,
                   "micro_batch_size": training.micro_batch_size,
                   "recompute": training.recompute, "precision": training.precision,
                   "step_time_s": t.total, "tflops_per_gpu": t.tflops_per_gpu, "mfu": t.mfu,
                   "peak_tflops": hw.peak_tflops, "memory_gb": result.memory_gb,
                   "fits_memory": fits,
                   "memory": {"params_gb": mem.weights.params / 1e9,
                              "grads_gb": mem.weights.grads / 1e9,
                              "optimizer_gb": mem.weights.optimizer / 1e9,
                              "activations_gb": mem.activations / 1e9,
                              "transient_gb": mem.transient / 1e9, "pp_rank": mem.pp_rank},
                   "breakdown_s": parts, "per_microbatch_s": t.breakdown(),
                   "calibration": FITTED.to_dict()})
        return 0
    print(f"{recipe.name} on {args.gpus} x {hw.name} ({args.gpus_per_node} per node): "
          f"{spec.describe()}")
    print(f"sequence {training.seq_length}, global batch {training.global_batch_size}, "
          f"micro-batch {training.micro_batch_size}, recompute {training.recompute}, "
          f"{training.precision}\n")
    print(f"step time      {t.total:.3f} s")
    print(f"TFLOP/s/GPU    {t.tflops_per_gpu:.0f}   (Megatron's FLOPs convention)")
    print(f"MFU            {100 * t.mfu:.1f}%   (of {hw.peak_tflops:g} TFLOP/s dense BF16)")
    print(f"memory         {result.memory_gb:.1f} GB on the busiest rank (pipeline rank "
          f"{mem.pp_rank}){'' if fits else f'; does not fit {hw.memory_gb:g} GB'}\n")
    rows = [[k, f"{v:.3f}", f"{100 * v / t.total:.1f}"] for k, v in parts.items()]
    print(format_table(["where the step goes", "s", "%"], rows))
    print("\ncalibrated step-time model (docs/calibration.md); accuracy is measured on H100 only")
    return 0
