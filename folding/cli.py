"""The ``folding`` command line: one subcommand per module in ``folding.commands``.

Each command module has ``register(subparsers)``, which adds its parser and sets ``handler``.
Modules import torch and Megatron inside their handlers, so ``folding mesh`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from folding.errors import FoldingError

COMMANDS = ("mesh", "verify", "plan", "predict", "mfu", "flags", "train", "place", "trace", "megatron", "checkpoint")


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="folding", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in COMMANDS:
        importlib.import_module(f"folding.commands.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except FoldingError as e:
        print(f"folding {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"folding {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
