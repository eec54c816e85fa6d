"""The ``folding`` command line: one subcommand per module in ``folding.commands``.

Each command module has ``register(subparsers)``, which adds its parser and sets ``handler``.
Only the command asked for is imported (all of them for ``--help`` or an unknown name), so a
command that needs no torch, such as ``folding predict``, does not wait for another's imports.
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


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``only`` (one of ``COMMANDS``)."""
    parser = OneLineParser(prog="folding", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in COMMANDS if only is None else (only,):
        importlib.import_module(f"folding.commands.{name}").register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    asked = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(asked).parse_args(argv)
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
