"""``folding checkpoint convert``: the full checkpoint to Megatron-LM's torch_dist and back."""

from __future__ import annotations

import argparse

from folding.commands.common import add_json_argument, emit_json

FORMATS = ("full", "torch_dist")  # folding.layout.megatron_checkpoint.FORMATS, without its imports


def register(sub) -> None:
    p = sub.add_parser("checkpoint", help="convert checkpoints (full layout <-> Megatron-LM torch_dist)",
                       description="Work with checkpoints.")
    actions = p.add_subparsers(dest="action", required=True, parser_class=type(p))
    c = actions.add_parser(
        "convert", help="convert a full checkpoint to Megatron-LM's torch_dist, or back",
        description="Convert SRC into a new directory DST: a full checkpoint (folding train "
                    "--save) into Megatron-LM's torch_dist layout (latest_checkpointed_iteration.txt, "
                    "iter_NNNNNNN/), or a torch_dist directory into a full checkpoint. Megatron-LM "
                    "loads the model and the iteration only: resume it with --no-load-optim "
                    "--no-load-rng. Adam's moments are kept for the way back to the full layout.")
    c.add_argument("src", metavar="SRC", help="checkpoint directory to read")
    c.add_argument("dst", metavar="DST", help="directory to create (must not exist)")
    c.add_argument("--to", choices=FORMATS,
                   help="format to write (default: the one SRC is not in)")
    c.add_argument("--recipe", help="recipe name or YAML file of the model (default: the one SRC "
                                    "names; needed for a torch_dist directory Megatron-LM wrote)")
    add_json_argument(c)
    c.set_defaults(handler=run_convert)


def summary_text(s) -> str:
    lines = [f"converted {s.source_format} checkpoint {s.source} ({s.recipe}, iteration "
             f"{s.iteration}) to {s.target_format} {s.destination}: {s.model_tensors} model tensors"
             + (", Adam's moments" if s.adam_moments else "")]
    if s.target_format == "torch_dist":
        lines.append("Megatron-LM loads the model and the iteration: resume with --load "
                     f"{s.destination} --no-load-optim --no-load-rng")
    elif not s.adam_moments:
        lines.append("no Adam state in the source: a run resumed from it starts a fresh optimizer")
    return "\n".join(lines)


def run_convert(args: argparse.Namespace) -> int:
    from folding.layout.megatron_checkpoint import convert

    summary = convert(args.src, args.dst, to=args.to, recipe_name=args.recipe)
    if args.json:
        emit_json(summary.to_json())
    else:
        print(summary_text(summary))
    return 0
