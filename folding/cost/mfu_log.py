"""Throughput and MFU from Megatron-LM training logs.

Megatron prints, every log interval, a line with ``elapsed time per iteration (ms)``,
``global batch size`` and, with --log-throughput, ``throughput per GPU (TFLOP/s/GPU)``. This
module reads those lines, recomputes TFLOP/s per GPU from the recipe's FLOPs (Megatron's
convention by default, so the two should agree to the printed rounding) and MFU against a
peak, and flags intervals where Megatron's own figure disagrees: an older Megatron counting
recomputation, a different world size, or a model that is not the recipe's.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Dict, List, Optional

from folding.cost.flops import CONVENTIONS, training_flops
from folding.errors import FoldingError
from folding.recipe import Recipe

ITERATION = re.compile(r"iteration\s+(\d+)\s*/\s*(\d+)")
ELAPSED = re.compile(r"elapsed time per iteration \(ms\):\s*([0-9.]+)")
THROUGHPUT = re.compile(r"throughput per GPU \(TFLOP/s/GPU\):\s*([0-9.]+)")
GLOBAL_BATCH = re.compile(r"global batch size:\s*(\d+)")
WORLD_SIZE = re.compile(r"using world size:\s*(\d+)")

# Megatron prints throughput with one decimal.
PRINTED_ROUNDING = 0.05


@dataclass(frozen=True)
class Interval:
    """One log line: the averages of one log interval."""

    iteration: int
    elapsed_ms: float
    global_batch_size: int
    tflops_per_gpu: float
    """Recomputed from the recipe's FLOPs."""
    mfu: float
    megatron_tflops_per_gpu: Optional[float]
    """What Megatron printed, when it printed throughput."""
    disagrees: bool
    """Megatron's figure differs from ours by more than the tolerance."""


@dataclass(frozen=True)
class MfuReport:
    intervals: List[Interval]
    world_size: int
    world_size_source: str
    peak_tflops: float
    convention: str

    @property
    def steady(self) -> List[Interval]:
        """Intervals after the first (which includes start-up and compilation)."""
        return self.intervals[1:] if len(self.intervals) > 1 else self.intervals

    def summary(self) -> Dict[str, float]:
        steady = self.steady
        return {"median_tflops_per_gpu": median(i.tflops_per_gpu for i in steady),
                "median_mfu": median(i.mfu for i in steady),
                "disagreements": sum(i.disagrees for i in self.intervals)}

    def to_json(self) -> Dict:
        return {"world_size": self.world_size, "world_size_source": self.world_size_source,
                "peak_tflops": self.peak_tflops, "convention": self.convention,
                "convention_label": CONVENTIONS[self.convention], "summary": self.summary(),
                "intervals": [asdict(i) for i in self.intervals]}


def read_log(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FoldingError(f"log file {path} does not exist")
    return p.read_text(errors="replace")


def parse_mfu(text: str, recipe: Recipe, peak_tflops: float, world_size: Optional[int] = None,
              convention: str = "megatron", tolerance: float = 0.01) -> MfuReport:
    """Every interval line of a Megatron log, with our TFLOP/s/GPU and MFU.

    The world size comes from ``world_size``, else the log's "using world size" line, else the
    recipe's folding. ``tolerance`` is the relative difference (beyond the printed rounding) at
    which Megatron's throughput is flagged.
    """
    if world_size is not None:
        source = "--world-size"
    else:
        found = WORLD_SIZE.search(text)
        world_size, source = ((int(found.group(1)), "log") if found
                              else (recipe.folding.world_size, "recipe"))
    flops_cache: Dict[int, int] = {}
    intervals = []
    for line in text.splitlines():
        elapsed = ELAPSED.search(line)
        iteration = ITERATION.search(line)
        if not elapsed or not iteration:
            continue
        batch_match = GLOBAL_BATCH.search(line)
        batch = int(batch_match.group(1)) if batch_match else recipe.training.global_batch_size
        if batch not in flops_cache:
            flops_cache[batch] = training_flops(recipe.model, recipe.training.seq_length, batch,
                                                recipe.folding.tp, convention)
        ms = float(elapsed.group(1))
        if ms <= 0:
            continue
        ours = flops_cache[batch] / (ms / 1000 * 1e12 * world_size)
        printed = THROUGHPUT.search(line)
        theirs = float(printed.group(1)) if printed else None
        disagrees = theirs is not None and abs(theirs - ours) > PRINTED_ROUNDING + tolerance * ours
        intervals.append(Interval(iteration=int(iteration.group(1)), elapsed_ms=ms,
                                  global_batch_size=batch, tflops_per_gpu=ours,
                                  mfu=ours / peak_tflops, megatron_tflops_per_gpu=theirs,
                                  disagrees=disagrees))
    if not intervals:
        raise FoldingError("no Megatron iteration lines (with 'elapsed time per iteration (ms)') "
                           "in the log")
    return MfuReport(intervals, world_size, source, peak_tflops, convention)
