"""Byte-level training data: a text file read as bytes, cut into fixed-length sequences.

Batches are a pure function of (seed, step): every folding of a run, and the single-process
reference, see the same sequences, split the same way over data-parallel ranks and micro-batches.
They are drawn on the CPU (numpy) whatever the device, then moved in one copy to the rank's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from folding.errors import FoldingError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = PACKAGE_DIR.parent
VOCAB_SIZE = 256


def resolve_data_path(path: str) -> Path:
    """A data path as given, else relative to the repository, else to the package."""
    for candidate in (Path(path), REPO_DIR / path, PACKAGE_DIR / path):
        if candidate.exists():
            return candidate
    raise FoldingError(f"training text {path} does not exist")


class ByteCorpus:
    """A text file as a sequence of byte tokens (vocabulary 256)."""

    def __init__(self, path: str):
        self.path = resolve_data_path(path)
        self.tokens = np.frombuffer(self.path.read_bytes(), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.tokens)

    def global_batch(self, seed: int, step: int, num_sequences: int, seq_length: int,
                     device=None) -> torch.Tensor:
        """[num_sequences, seq_length + 1] tokens at offsets drawn from (seed, step), on
        ``device`` (the CPU by default)."""
        if len(self.tokens) <= seq_length + 1:
            raise FoldingError(f"{self.path} has {len(self.tokens)} bytes, fewer than one sequence "
                               f"of {seq_length + 1}")
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.tokens) - seq_length - 1, size=num_sequences)
        rows = np.stack([self.tokens[s:s + seq_length + 1] for s in starts])
        return torch.from_numpy(rows.astype(np.int64)).to(device or "cpu")


def micro_batches(batch: torch.Tensor, dp_rank: int, dp_size: int, num_micro_batches: int,
                  micro_batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """The micro-batches of one data-parallel rank: sequence (d*M + m)*mbs + b of the global batch.

    With dp_size=1 and num_micro_batches=DP*M this yields every rank's micro-batches in rank
    order, which is how the single-process reference sees the same data. They are on the
    batch's device.
    """
    expected = dp_size * num_micro_batches * micro_batch_size
    if batch.shape[0] != expected:
        raise FoldingError(f"global batch has {batch.shape[0]} sequences, expected {expected}")
    out = []
    seq_length = batch.shape[1] - 1
    positions = torch.arange(seq_length, device=batch.device).unsqueeze(0).expand(micro_batch_size, -1)
    for m in range(num_micro_batches):
        first = (dp_rank * num_micro_batches + m) * micro_batch_size
        rows = batch[first:first + micro_batch_size]
        out.append({"tokens": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous(),
                    "position_ids": positions})
    return out
