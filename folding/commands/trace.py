"""``folding trace``: synthetic routing traces, Megatron router-trace import, and a summary of any trace file."""

from __future__ import annotations

import argparse
import sys

from folding.commands.common import add_json_argument, emit_json, format_table
from folding.errors import FoldingError


def register(sub) -> None:
    p = sub.add_parser("trace", help="make or inspect routing traces (.npz)",
                       description="Routing traces record the top-k experts of every token at every "
                                   "MoE layer; `folding place` fits placements on them.")
    actions = p.add_subparsers(dest="trace_command", required=True, parser_class=type(p))

    synth = actions.add_parser("synth", help="write a synthetic trace",
                               description="Draw a trace with controllable popularity skew, co-activation "
                                           "inside a layer and affinity between consecutive layers.")
    synth.add_argument("--experts", type=int, required=True, help="experts per MoE layer")
    synth.add_argument("--layers", type=int, required=True, help="MoE layers")
    synth.add_argument("--tokens", type=int, required=True, help="tokens")
    synth.add_argument("--topk", type=int, required=True, help="experts per token")
    synth.add_argument("--skew", type=float, default=0.5, help="Zipf exponent of expert popularity (0: uniform)")
    synth.add_argument("--coactivation", type=float, default=0.0,
                       help="probability that each non-top-1 expert comes from the top-1 expert's group")
    synth.add_argument("--group-size", type=int, default=8, help="experts per co-activation group")
    synth.add_argument("--affinity", type=float, default=0.0,
                       help="probability that a token's top-1 expert follows its chain to the next layer")
    synth.add_argument("--drift", type=float, default=0.0,
                       help="share of experts per layer whose roles are reassigned (routing drift)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the structure (roles, groups, chains)")
    synth.add_argument("--token-seed", type=int, default=1, help="seed of the token draws")
    synth.add_argument("--drift-seed", type=int, default=2, help="seed of the drift")
    synth.add_argument("--out", required=True, metavar="FILE", help="trace to write (.npz)")
    add_json_argument(synth)
    synth.set_defaults(handler=run_synth)

    imp = actions.add_parser("import", help="convert Megatron-Core's router-trace JSONL to a trace",
                             description="Read the router_trace_rank{R}.jsonl files that Megatron-Core "
                                         "0.19 writes with --moe-routing-trace-path, align each token "
                                         "across all MoE layers (by step, micro-batch and position) "
                                         "and write a .npz trace; tokens that cannot be aligned are "
                                         "dropped and counted.")
    imp.add_argument("files", nargs="+", metavar="FILE",
                     help="router-trace JSONL file(s); several files must hold the same layers "
                          "(ranks of one pipeline stage), their tokens are concatenated")
    imp.add_argument("--experts", type=int, default=None,
                     help="experts per MoE layer (default: the records' logit_shape, else the "
                          "largest expert id + 1)")
    imp.add_argument("--out", required=True, metavar="FILE", help="trace to write (.npz)")
    add_json_argument(imp)
    imp.set_defaults(handler=run_import)

    info = actions.add_parser("info", help="check a trace and summarise it")
    info.add_argument("file", help="trace (.npz)")
    add_json_argument(info)
    info.set_defaults(handler=run_info)


def trace_summary(trace) -> dict:
    """Sizes, the hottest expert's share of pairs, and how often the top-1 expert repeats its
    most frequent successor (a quick look at skew and inter-layer affinity)."""
    counts = trace.expert_counts()
    hottest = float((counts.max(axis=1) / counts.sum(axis=1)).mean())
    transitions = trace.top1_transitions()
    follow = float(transitions.max(axis=2).sum() / transitions.sum()) if trace.num_layers > 1 else None
    return {"layers": trace.num_layers, "tokens": trace.num_tokens, "topk": trace.top_k,
            "experts": trace.num_experts, "probs": trace.probs is not None,
            "hottest_expert_share": hottest, "top1_follows_likeliest_successor": follow}


def print_summary(path: str, summary: dict) -> None:
    rows = [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in summary.items()]
    print(f"{path}:")
    print(format_table(["field", "value"], rows))


def write_trace(trace, path: str) -> dict:
    """Save ``trace`` to ``path`` (an unwritable path is a FoldingError) and return its summary."""
    try:
        trace.save(path)
    except OSError as e:
        raise FoldingError(f"cannot write {path}: {e.strerror or e}") from None
    return trace_summary(trace)


def run_synth(args: argparse.Namespace) -> int:
    from folding.placement.synth import SynthSpec, synthesize

    spec = SynthSpec(args.experts, args.layers, args.tokens, args.topk, skew=args.skew,
                     coactivation=args.coactivation, group_size=args.group_size, affinity=args.affinity,
                     drift=args.drift, seed=args.seed, token_seed=args.token_seed, drift_seed=args.drift_seed)
    trace = synthesize(spec, progress=sys.stderr.isatty())
    summary = write_trace(trace, args.out)
    if args.json:
        emit_json({"out": args.out, **summary})
    else:
        print_summary(args.out, summary)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from folding.placement.megatron_trace import import_megatron_trace

    trace, report = import_megatron_trace(args.files, num_experts=args.experts)
    summary = write_trace(trace, args.out)
    facts = report.as_dict()
    if args.json:
        emit_json({"out": args.out, **summary, **facts})
    else:
        print_summary(args.out, summary)
        print(f"read {facts['records']} records from {len(facts['files'])} file(s): "
              f"{facts['groups']} aligned micro-batch groups over {facts['steps']} step(s), "
              f"Megatron layers {facts['layer_ids']}")
        print(f"dropped {facts['dropped_records']} records ({facts['dropped_tokens']} tokens) "
              f"that could not be aligned across all layers; skipped "
              f"{facts['skipped_mtp_records']} MTP records")
        if facts["experts_inferred"]:
            print(f"experts per layer inferred as {trace.num_experts} (largest id + 1); "
                  f"pass --experts to set it")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from folding.placement.trace import load_trace

    summary = trace_summary(load_trace(args.file))
    if args.json:
        emit_json({"file": args.file, **summary})
    else:
        print_summary(args.file, summary)
    return 0

