"""Re-placement during training, the pure part: live routing statistics, what a placement is
predicted to send, and whether a new placement pays for the experts it moves.

``RoutingStatistics`` holds, per MoE layer, what the router chose over a window of steps: the
(token, expert) pairs per expert, the co-activation counts (tokens that picked both experts)
and the layer-to-layer top-1 transitions. It answers the questions the training solver asks of
a routing trace (``expert_counts``, ``coactivation``, ``top1_transitions``), so
``solver.solve`` places experts on it directly, without per-token data.

What a placement sends is predicted from the pairs alone. The folded dispatcher sends a token
once to each distinct rank hosting one of its experts; for a token with top-k experts that is
k minus its co-located pairs, exactly for k <= 2 without replicas (a lower bound beyond, as
inclusion-exclusion stops at pairs); replicas count at a replica chosen uniformly, as in
``metrics``. A token starts on any EP rank alike (batches are drawn independently of the rank),
so of the rows it sends a share 1 - 1/P leaves its rank and 1 - G/P its node. Each row crosses
four times per step: dispatch and combine in the forward pass, and both again as gradients.

``decide`` is one re-placement attempt: a warm-started solve within a move budget, the new
placement aligned to the current one (an expert that stays on its rank keeps its slot), and the
verdict: applied when the bytes it is predicted to save over the next interval cover the bytes
it moves (parameters, fp32 main parameters and both Adam moments of every expert that changes
slot), else skipped. Nothing here touches torch or a process group: ``folding.run.replacement``
does the collecting, the communication and the moving.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import numpy as np

from folding.errors import FoldingError
from folding.placement.placement import Placement

PASSES_PER_STEP = 4
"""Times a dispatched row crosses the network per step: dispatch, combine, and their gradients."""


@dataclass(eq=False)
class RoutingStatistics:
    """Router choices of every MoE layer summed over a window of steps."""

    num_experts: int
    top_k: int
    counts: np.ndarray
    """float64 [L, E]: (token, expert) pairs per expert."""
    pairs: np.ndarray
    """float64 [L, E, E]: tokens that picked both experts (symmetric, zero diagonal)."""
    transitions: np.ndarray
    """float64 [max(L-1, 0), E, E]: tokens with top-1 expert i at layer l and j at layer l+1."""
    steps: int = 0
    """Training steps summed in."""

    @classmethod
    def empty(cls, num_experts: int, num_layers: int, top_k: int) -> "RoutingStatistics":
        E, L = num_experts, num_layers
        return cls(E, top_k, np.zeros((L, E)), np.zeros((L, E, E)),
                   np.zeros((max(L - 1, 0), E, E)), 0)

    # ------------------------------------------------------------ the solver's trace interface
    @property
    def num_layers(self) -> int:
        return self.counts.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens routed per layer (the mean over layers, which differ only under PP)."""
        return int(round(self.counts.sum() / max(self.num_layers * self.top_k, 1)))

    def expert_counts(self) -> np.ndarray:
        return self.counts.copy()

    def coactivation(self, layer: int) -> np.ndarray:
        return self.pairs[layer].copy()

    def top1_transitions(self) -> np.ndarray:
        return self.transitions.copy()

    # ------------------------------------------------------------ windows and files
    @property
    def tokens_per_step(self) -> float:
        return self.num_tokens / self.steps if self.steps else 0.0

    def flat(self) -> np.ndarray:
        """Every count in one float64 vector (what the ranks sum); ``from_flat`` inverts it."""
        return np.concatenate([self.counts.ravel(), self.pairs.ravel(), self.transitions.ravel()])

    def from_flat(self, values: np.ndarray, steps: int) -> "RoutingStatistics":
        """Statistics of the same shape as this one holding ``values``."""
        sizes = np.cumsum([self.counts.size, self.pairs.size])
        counts, pairs, transitions = np.split(np.asarray(values, dtype=np.float64), sizes)
        return RoutingStatistics(self.num_experts, self.top_k, counts.reshape(self.counts.shape),
                                 pairs.reshape(self.pairs.shape),
                                 transitions.reshape(self.transitions.shape), steps)

    def to_json(self) -> dict:
        return {"num_experts": self.num_experts, "top_k": self.top_k, "steps": self.steps,
                "num_layers": self.num_layers, "values": self.flat().tolist()}

    @classmethod
    def from_json(cls, obj: dict, source: str = "routing statistics") -> "RoutingStatistics":
        try:
            shape = cls.empty(int(obj["num_experts"]), int(obj["num_layers"]), int(obj["top_k"]))
            values = np.asarray(obj["values"], dtype=np.float64)
            steps = int(obj["steps"])
        except (KeyError, TypeError, ValueError) as e:
            raise FoldingError(f"{source}: malformed ({e})") from None
        if values.size != shape.flat().size:
            raise FoldingError(f"{source}: {values.size} values, {shape.flat().size} expected")
        return shape.from_flat(values, steps)


# ---------------------------------------------------------------------------- predictions
def colocated_pairs(placement: Placement, stats: RoutingStatistics, level: str = "rank") -> float:
    """Expected (token, pair of its experts) that land on one rank (node), over all layers."""
    total = 0.0
    for layer in range(stats.num_layers):
        share = placement.host_fractions(layer, level)
        together = share @ share.T
        # ``pairs`` counts each unordered pair twice (it is symmetric).
        total += 0.5 * float(np.sum(stats.pairs[layer] * together))
    return total


def rows_per_step(placement: Placement, stats: RoutingStatistics) -> dict:
    """Predicted rows one step sends: to every rank reached, off the source rank, off its node."""
    if not stats.steps:
        return {"rows": 0.0, "cross_rank": 0.0, "cross_node": 0.0}
    P = placement.ep_size
    per_node = min(placement.gpus_per_node, P)
    distinct = stats.counts.sum() - colocated_pairs(placement, stats)
    rows = distinct / stats.steps
    return {"rows": rows, "cross_rank": rows * (1 - 1 / P), "cross_node": rows * (1 - per_node / P)}


def changed_slots(old: Placement, new: Placement) -> int:
    """Slots whose expert changes, over all layers: each receives a copy of an expert."""
    return int(np.sum(old.layers != new.layers))


def align_to_previous(new: Placement, previous: Placement) -> Placement:
    """``new`` with the slots inside each rank reordered so that an expert staying on its rank
    keeps its slot: the solver lists a rank's slots by expert, which would otherwise count as
    moves that cost a copy and save nothing."""
    S = new.slots_per_rank
    rows = new.layers.copy()
    for layer in range(new.num_layers):
        for rank in range(new.ep_size):
            cut = slice(rank * S, (rank + 1) * S)
            before, after = list(previous.layers[layer, cut]), list(new.layers[layer, cut])
            out: List[Optional[int]] = [None] * S
            for j, expert in enumerate(before):
                if expert in after:
                    out[j] = expert
                    after.remove(expert)
            free = iter(after)
            rows[layer, cut] = [e if e is not None else next(free) for e in out]
    return Placement(new.num_experts, new.num_layers, new.ep_size, new.slots_per_rank,
                     new.gpus_per_node, rows).validate()


def transfer_plan(old_row: np.ndarray, new_row: np.ndarray, slots_per_rank: int) -> List[Tuple[int, int]]:
    """(source slot, destination slot) for every slot whose expert changes: the source holds
    the expert now, on the destination's rank when it can (a local copy), else the first."""
    out = []
    for dst in np.flatnonzero(old_row != new_row):
        holders = np.flatnonzero(old_row == new_row[dst])
        if holders.size == 0:
            raise FoldingError(f"expert {int(new_row[dst])} has no slot to copy from")
        local = holders[holders // slots_per_rank == dst // slots_per_rank]
        out.append((int(local[0] if local.size else holders[0]), int(dst)))
    return out


# ---------------------------------------------------------------------------- one attempt
@dataclass
class Attempt:
    """One re-placement attempt, as ``folding train --json`` reports it."""

    step: int
    """Step boundary where the statistics were taken and the solve started."""
    slots_moved: int
    bytes_moved: int
    predicted_saving: float
    """Cross-rank bytes the new placement is predicted to save over the next interval."""
    predicted_cross_node_saving: float
    applied: bool
    reason: str
    solve_s: float
    applied_at: Optional[int] = None
    """Step boundary where the experts moved (None when skipped)."""
    cross_node_rows_before: float = 0.0
    cross_node_rows_after: float = 0.0
    """Predicted cross-node rows per step under the current and the new placement."""

    def to_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        what = (f"applied at step {self.applied_at}" if self.applied else f"skipped ({self.reason})")
        return (f"re-placement at step {self.step}: {self.slots_moved} slots, "
                f"{self.bytes_moved / 1e6:.2f} MB to move, predicted saving "
                f"{self.predicted_saving / 1e6:.2f} MB over the interval "
                f"({self.predicted_cross_node_saving / 1e6:.2f} MB cross-node), {what}")


@dataclass
class MoveCosts:
    """What a re-placement moves and what a row costs, in bytes."""

    expert_bytes: int
    """One expert in full: parameters, fp32 main parameters when they differ, both Adam moments."""
    row_bytes: int
    """One dispatched row: hidden size x the hidden states' element size."""
    copies: int = 1
    """EP groups (expert-data-parallel ranks): each moves its own copy and sends its own rows."""


def decide(current: Placement, stats: RoutingStatistics, step: int, interval: int,
           max_moved: float, costs: MoveCosts, time_limit: Optional[float] = None,
           always: bool = False) -> Tuple[Optional[Placement], Attempt]:
    """Solve from ``current`` within ``max_moved`` of each layer's slots and judge the result.

    Returns the placement to switch to (None when skipped) and the attempt's record. The saving
    is counted over ``interval`` steps at the window's tokens per step, in cross-rank bytes (what
    leaves a rank, the network traffic the move competes with). ``always`` applies any placement
    that moves a slot, whatever it saves (for checks that the switch is exact)."""
    from folding.placement.solver import solve

    started = time.perf_counter()

    def skipped(reason: str, slots: int = 0, moved: int = 0, saving: float = 0.0,
                node_saving: float = 0.0, before: float = 0.0, after: float = 0.0):
        return None, Attempt(step, slots, moved, saving, node_saving, False, reason,
                             time.perf_counter() - started, None, before, after)

    if stats.steps == 0 or stats.counts.sum() == 0:
        return skipped("no routing statistics")
    if max_moved <= 0:
        return skipped("move budget is 0")
    result = solve(stats, current.ep_size, current.gpus_per_node, "training",
                   redundant=current.redundant_slots, time_limit=time_limit, previous=current,
                   max_moved=max_moved, workers=1)
    new = align_to_previous(result.placement, current)
    slots = changed_slots(current, new)
    before, after = rows_per_step(current, stats), rows_per_step(new, stats)
    scale = PASSES_PER_STEP * costs.row_bytes * interval
    saving = (before["cross_rank"] - after["cross_rank"]) * scale
    node_saving = (before["cross_node"] - after["cross_node"]) * scale
    moved = slots * costs.expert_bytes * costs.copies
    if slots == 0:
        return skipped("the solver kept every slot", 0, 0, 0.0, 0.0, before["cross_node"],
                       before["cross_node"])
    if saving < moved and not always:
        return skipped("predicted saving does not cover the bytes moved", slots, moved, saving,
                       node_saving, before["cross_node"], after["cross_node"])
    reason = "saving covers the move" if saving >= moved else "applied whatever it saves"
    return new, Attempt(step, slots, moved, saving, node_saving, True, reason,
                        time.perf_counter() - started, None, before["cross_node"],
                        after["cross_node"])
