"""Megatron's context-parallel sequence layout, and the sequence-length rules it implies.

Megatron's batch split (``get_batch_on_this_cp_rank``) cuts each sequence into 2 x CP equal
chunks and gives CP rank r chunks r and 2 x CP - 1 - r, so every rank holds as much of the causal
triangle as any other. Everything here is pure arithmetic on that layout.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from folding.errors import FoldingError


def rank_chunks(cp: int, cp_rank: int) -> Tuple[int, int]:
    """The two chunk indices (of 2 x CP) that CP rank ``cp_rank`` holds, in its order."""
    return cp_rank, 2 * cp - 1 - cp_rank


def rank_positions(seq_length: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Token positions (in the full sequence) of the tokens CP rank ``cp_rank`` holds."""
    if cp == 1:
        return torch.arange(seq_length)
    chunk = seq_length // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in rank_chunks(cp, cp_rank)])


def gathered_positions(seq_length: int, cp: int) -> torch.Tensor:
    """Token positions of every rank's tokens laid end to end in CP-rank order (what a gather
    over the CP group produces)."""
    return torch.cat([rank_positions(seq_length, cp, r) for r in range(cp)])


def sequence_length_problems(seq_length: int, cp: int, tp: int = 1,
                             sequence_parallel: bool = False) -> List[str]:
    """Why ``seq_length`` cannot be split over CP (and TP with sequence parallel); [] if it can."""
    if cp == 1:
        if sequence_parallel and seq_length % tp:
            return [f"seq-len={seq_length} is not divisible by TP={tp} (sequence parallel)"]
        return []
    need = 2 * cp * (tp if sequence_parallel else 1)
    if seq_length % need:
        what = f"2 x CP x TP = 2 x {cp} x {tp}" if sequence_parallel else f"2 x CP = 2 x {cp}"
        return [f"seq-len={seq_length} is not divisible by {what} = {need} (Megatron's "
                f"load-balanced context-parallel split{' with sequence parallel' if sequence_parallel else ''})"]
    return []


def check_sequence_length(seq_length: int, spec) -> None:
    """Raise a one-line FoldingError when ``seq_length`` does not split over ``spec``'s CP/TP."""
    problems = sequence_length_problems(seq_length, spec.cp, spec.tp, bool(spec.sequence_parallel))
    if problems:
        raise FoldingError(problems[0])

