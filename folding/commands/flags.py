"""``folding flags``: the Megatron-LM pretrain_gpt.py flags of a recipe."""

from __future__ import annotations

import argparse
import shlex

from folding.commands.common import add_json_argument, emit_json
from folding.megatron.flags import launch_environment, recipe_flags
from folding.recipe import load_recipe


def register(sub) -> None:
    p = sub.add_parser("flags", help="print a recipe's Megatron pretrain_gpt.py flags",
                       description="Print the pretrain_gpt.py flags of a recipe's model, training "
                                   "setup and folding (data and tokenizer flags are yours to add).")
    p.add_argument("--recipe", required=True, help="recipe name (recipes/<name>.yaml) or path")
    add_json_argument(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    flags = recipe_flags(recipe)
    env = launch_environment(recipe.folding)
    if args.json:
        emit_json({"recipe": recipe.name, "flags": flags, "env": env,
                   "vocab_size": recipe.model.vocab_size,
                   "note": "add data and tokenizer flags; the model assumes the vocabulary size above"})
        return 0
    lines = [f"# {recipe.name}: {recipe.folding.describe()} on {recipe.folding.world_size} GPUs",
             "# add --data-path/--mock-data and tokenizer flags for your data"]
    lines += [f"export {k}={v}" for k, v in env.items()]
    pairs, i = [], 0
    while i < len(flags):
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            pairs.append(f"{flags[i]} {shlex.quote(flags[i + 1])}")
            i += 2
        else:
            pairs.append(flags[i])
            i += 1
    lines.append("pretrain_gpt.py \\")
    lines += [f"    {p} \\" for p in pairs[:-1]] + [f"    {pairs[-1]}"]
    print("\n".join(lines))
    return 0
