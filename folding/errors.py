"""User-facing errors.

Anything the user can fix (a bad folding, a malformed file, a missing option) raises a
``FoldingError``. The command line turns it into one line on stderr and exit status 2, with no
traceback; library callers catch it like any other exception.
"""

from __future__ import annotations

from typing import Iterable


class FoldingError(ValueError):
    """A problem with the user's input, described in one line."""


class InvalidFolding(FoldingError):
    """A folding violates one or more rules; ``violations`` holds one message per rule."""

    def __init__(self, violations: Iterable[str]):
        self.violations = list(violations)
        super().__init__("invalid folding: " + "; ".join(self.violations))
