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
so of the rows it sends a share 1 - 1/P leaves its rank and 1 - G/P its node. Under node-level
deduplication a token goes once to each distinct remote node instead, so its cross-node rows
are its distinct nodes (k minus its pairs co-located on a node) times 1 - G/P. Each row crosses
four times per step: dispatch and combine in the forward pass, and both again as gradients.

``decide`` is one re-placement attempt: candidates within a move budget (the solver
warm-started from the current placement; fresh solves on the window, from several seeds,
relabelled to overlap the current placement and cut to the budget cycle of moves by cycle of
moves), each aligned to the current placement (an expert that stays on its rank keeps its
slot); the one with the best net saving is judged: applied when the bytes it is predicted to
save over the next interval cover the bytes it moves (parameters, fp32 main parameters and
both Adam moments of every expert that changes slot), counted on one link: cross-rank bytes
saved against the copies from other ranks, or, under node-level deduplication, cross-node bytes
saved against the copies from other nodes (a copy inside a node travels over NVLink, not the
network the saving is counted on); else skipped. Nothing here touches
torch or a process group: ``folding.run.replacement`` does the collecting, the communication
and the moving.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

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

    @classmethod
    def of_trace(cls, trace, steps: int = 1) -> "RoutingStatistics":
        """What the live hook would have summed over ``trace``'s tokens in ``steps`` steps."""
        stats = cls.empty(trace.num_experts, trace.num_layers, trace.top_k)
        stats.counts[:] = trace.expert_counts()
        for layer in range(trace.num_layers):
            stats.pairs[layer] = trace.coactivation(layer)
        stats.transitions[:] = trace.top1_transitions()
        stats.steps = steps
        return stats

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

    def added(self, other: "RoutingStatistics") -> "RoutingStatistics":
        """The sum of two windows of the same model."""
        return self.from_flat(self.flat() + other.flat(), self.steps + other.steps)

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


def rows_per_step(placement: Placement, stats: RoutingStatistics, node_dedup: bool = False) -> dict:
    """Predicted rows one step sends: to every rank reached, off the source rank, off its node.

    ``node_dedup``: the dispatcher sends a token's rows once per distinct remote node (to one
    rank there, which forwards them), so its cross-node rows follow the distinct nodes a token
    reaches, not the distinct ranks (exact for top-2 without replicas, as for ranks)."""
    if not stats.steps:
        return {"rows": 0.0, "cross_rank": 0.0, "cross_node": 0.0}
    P = placement.ep_size
    per_node = min(placement.gpus_per_node, P)
    distinct = stats.counts.sum() - colocated_pairs(placement, stats)
    rows = distinct / stats.steps
    cross_node = rows * (1 - per_node / P)
    if node_dedup and per_node < P:
        nodes = stats.counts.sum() - colocated_pairs(placement, stats, "node")
        cross_node = nodes / stats.steps * (1 - per_node / P)
    return {"rows": rows, "cross_rank": rows * (1 - 1 / P), "cross_node": cross_node}


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


def transfer_plan(old_row: np.ndarray, new_row: np.ndarray, slots_per_rank: int,
                  ranks_per_node: Optional[int] = None) -> List[Tuple[int, int]]:
    """(source slot, destination slot) for every slot whose expert changes: the source holds
    the expert now, on the destination's rank when it can (a local copy), else on its node
    (``ranks_per_node``: a copy that stays off the network), else the first."""
    spans = [slots_per_rank] + ([ranks_per_node * slots_per_rank] if ranks_per_node else [])
    out = []
    for dst in np.flatnonzero(old_row != new_row):
        holders = np.flatnonzero(old_row == new_row[dst])
        if holders.size == 0:
            raise FoldingError(f"expert {int(new_row[dst])} has no slot to copy from")
        nearest = [holders[holders // span == dst // span] for span in spans] + [holders]
        out.append((int(next(h for h in nearest if h.size)[0]), int(dst)))
    return out


def copies_across(old: Placement, new: Placement, level: str = "rank") -> int:
    """Slots whose expert changes and is copied from another rank (``level`` "node": another
    node), over all layers, as ``transfer_plan`` picks the sources: the copies that travel on
    the link a re-placement's saving is counted on."""
    S = old.slots_per_rank
    span = S * (old.gpus_per_node if level == "node" else 1)
    return sum(src // span != dst // span
               for layer in range(old.num_layers)
               for src, dst in transfer_plan(old.layers[layer], new.layers[layer], S,
                                             old.gpus_per_node))


# ---------------------------------------------------------------------------- a target, cut
def move_cycles(current: np.ndarray, target: np.ndarray) -> List[List[int]]:
    """The experts whose rank differs between ``current`` and ``target`` (rank per expert),
    split into cycles: expert a goes to the rank expert b leaves, b to the rank c leaves, ...,
    back to a's rank. Each cycle alone keeps every rank's expert count, so any subset of the
    cycles is a valid placement; short cycles first (a swap closes as soon as it can)."""
    moving = [int(e) for e in np.flatnonzero(current != target)]
    leaving: dict = {}
    for e in moving:
        leaving.setdefault(int(current[e]), []).append(e)
    used, cycles = set(), []
    for first in moving:
        if first in used:
            continue
        cycle, used_here = [first], {first}
        home = int(current[first])
        while int(target[cycle[-1]]) != home:
            options = [e for e in leaving[int(target[cycle[-1]])]
                       if e not in used and e not in used_here]
            closing = [e for e in options if int(target[e]) == home]
            nxt = (closing or options)[0]
            cycle.append(nxt)
            used_here.add(nxt)
        used |= used_here
        cycles.append(cycle)
    return cycles


def _layer_score(ranks: np.ndarray, pairs: np.ndarray, rank_nodes: np.ndarray,
                 node_dedup: bool, rank_weight: float, node_weight: float) -> float:
    """Co-located pairs of one layer (rank per expert), weighted as the training objective:
    what a placement saves, up to a constant, in cross-rank and cross-node rows."""
    same_rank = ranks[:, None] == ranks[None, :]
    together = float(np.sum(pairs[same_rank]))
    if node_dedup:
        nodes = rank_nodes[ranks]
        node_together = float(np.sum(pairs[nodes[:, None] == nodes[None, :]]))
    else:
        node_together = together
    return rank_weight * together + node_weight * node_together


def fresh_solve(stats: RoutingStatistics, like: Placement, seed: int = 0,
                time_limit: Optional[float] = None) -> Placement:
    """The training solve on ``stats`` from scratch for ``like``'s ranks and nodes, with the
    experts relabelled by a permutation drawn from ``seed`` first (0: none): the solver's
    search is deterministic, and the labels steer its ties and its random kicks, so each seed
    is another local optimum of the same problem. Returned in the original labels."""
    from folding.placement.solver import solve

    E = stats.num_experts
    order = np.arange(E) if seed == 0 else np.random.default_rng(seed).permutation(E)
    # Expert j of the relabelled statistics is expert order[j] of the real ones.
    relabelled = RoutingStatistics(E, stats.top_k, stats.counts[:, order],
                                   stats.pairs[:, order][:, :, order],
                                   stats.transitions[:, order][:, :, order], stats.steps)
    found = solve(relabelled, like.ep_size, like.gpus_per_node, "training",
                  redundant=like.redundant_slots, time_limit=time_limit, workers=1).placement
    return Placement(E, found.num_layers, found.ep_size, found.slots_per_rank,
                     found.gpus_per_node, order[found.layers]).validate()


def _rank_of_expert(placement: Placement, layer: int) -> np.ndarray:
    ranks = np.empty(placement.num_experts, dtype=np.int64)
    ranks[placement.layers[layer]] = placement.slot_ranks
    return ranks


def _from_ranks(ranks: Sequence[np.ndarray], like: Placement) -> Placement:
    """The placement with expert e of layer l on rank ``ranks[l][e]``, its slots aligned to
    ``like`` (``align_to_previous``)."""
    experts = [np.arange(like.num_experts)] * len(ranks)
    return align_to_previous(Placement.from_rank_assignment(
        like.num_experts, like.ep_size, like.gpus_per_node, experts, list(ranks)), like)


def _aligned_ranks(current: Placement, target: Placement) -> List[np.ndarray]:
    from folding.placement.training import align_ranks

    return [align_ranks(_rank_of_expert(target, layer), _rank_of_expert(current, layer),
                        current.rank_nodes) for layer in range(current.num_layers)]


def relabelled_to(current: Placement, target: Placement) -> Placement:
    """``target`` relabelled (whole nodes among equal-sized nodes, ranks inside a node, which
    changes no cost) and its slots ordered to keep the most experts where ``current`` has
    them: what switching to ``target`` in full would move."""
    return _from_ranks(_aligned_ranks(current, target), current)


def cut_to_budget(current: Placement, target: Placement, stats: RoutingStatistics,
                  max_moved: float, node_dedup: bool = False) -> List[Placement]:
    """Steps from ``current`` towards ``target`` (both without replicas), each applying one more
    cycle of moves (``move_cycles``) of some layer: the cycle with the best gain in co-located
    pairs (training objective weights) per moved slot, as long as it gains, fits the layer's
    move budget (``max_moved`` of its slots, as the solver counts it) and leaves no rank more
    loaded on the window than the more loaded of the two placements. ``target`` is relabelled
    first (``relabelled_to``). Returns the placement after each step, in order (the caller
    picks the prefix that pays best)."""
    from folding.placement.metrics import objective_weights

    if current.redundant_slots or target.redundant_slots:
        return []
    rank_weight, node_weight = objective_weights("training")
    rank_nodes = current.rank_nodes
    P = current.ep_size
    budget = int(np.floor(max_moved * P * current.slots_per_rank))
    state, cycles, left, limits = [], [], [], []
    for layer, goal in enumerate(_aligned_ranks(current, target)):
        now = _rank_of_expert(current, layer)
        loads = stats.counts[layer]
        limits.append(max(np.bincount(now, loads, P).max(), np.bincount(goal, loads, P).max())
                      * (1 + 1e-9))
        state.append(now)
        cycles.append([(c, goal[c]) for c in move_cycles(now, goal)])
        left.append(budget)
    score = [_layer_score(state[l], stats.pairs[l], rank_nodes, node_dedup, rank_weight,
                          node_weight) for l in range(current.num_layers)]

    def layer_options(layer: int) -> list:
        """(gain per moved slot, option index, trial ranks, gain) of each cycle of ``layer``
        that fits its budget and load limit and gains: a step changes one layer, so only that
        layer's options are weighed again."""
        loads, found = stats.counts[layer], []
        for index, (members, ranks) in enumerate(cycles[layer]):
            if len(members) > left[layer]:
                continue
            trial = state[layer].copy()
            trial[members] = ranks
            if np.bincount(trial, loads, P).max() > limits[layer]:
                continue
            gain = _layer_score(trial, stats.pairs[layer], rank_nodes, node_dedup, rank_weight,
                                node_weight) - score[layer]
            if gain > 1e-9:
                found.append((gain / len(members), index, trial, gain))
        return found

    options = [layer_options(layer) for layer in range(current.num_layers)]
    out = []
    while True:
        best = None
        for layer, found in enumerate(options):
            for per_slot, index, trial, gain in found:
                if best is None or per_slot > best[0]:
                    best = (per_slot, layer, index, trial, gain)
        if best is None:
            return out
        _, layer, index, trial, gain = best
        members, _ = cycles[layer].pop(index)
        state[layer], score[layer] = trial, score[layer] + gain
        left[layer] -= len(members)
        options[layer] = layer_options(layer)
        out.append(_from_ranks(state, current))


# ---------------------------------------------------------------------------- one attempt
@dataclass
class Attempt:
    """One re-placement attempt, as ``folding train --json`` reports it."""

    step: int
    """Step boundary where the statistics were taken and the solve started."""
    slots_moved: int
    bytes_moved: int
    predicted_saving: float
    """Bytes the new placement is predicted to save over the next interval, what the verdict
    weighs against ``bytes_moved``: cross-rank bytes, or cross-node bytes under node-level
    deduplication (``decide``'s ``node_dedup``)."""
    predicted_cross_node_saving: float
    applied: bool
    reason: str
    solve_s: float
    applied_at: Optional[int] = None
    """Step boundary where the experts moved (None when skipped)."""
    cross_node_rows_before: float = 0.0
    cross_node_rows_after: float = 0.0
    """Predicted cross-node rows per step under the current and the new placement."""
    candidate: str = ""
    """Which candidate was judged: "warm" (the warm-started solve) or "cut N" (a fresh solve
    cut to its first N cycles of moves); empty when there was none."""
    bytes_moved_across: int = 0
    """Of ``bytes_moved``, what crosses the link the saving is counted on (another rank; another
    node under node-level deduplication): what the verdict weighs the saving against."""

    def to_json(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        what = (f"applied at step {self.applied_at}" if self.applied else f"skipped ({self.reason})")
        return (f"re-placement at step {self.step}: {self.slots_moved} slots, "
                f"{self.bytes_moved / 1e6:.2f} MB to move ({self.bytes_moved_across / 1e6:.2f} MB "
                f"over the link the saving is counted on), predicted saving "
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
           always: bool = False, node_dedup: bool = False,
           candidates: Sequence[str] = ("warm", "cut"),
           fresh_solves: int = 3) -> Tuple[Optional[Placement], Attempt]:
    """Find placements within ``max_moved`` of each layer's slots from ``current``, keep the one
    with the best net saving, and judge it.

    Candidates (``candidates``): "warm", the solver warm-started from ``current`` within the
    budget; "cut", a fresh solve on the window (what an offline placement would be), relabelled
    to overlap ``current`` and cut to the budget one cycle of moves at a time, best gain per
    moved slot first (``cut_to_budget``), every prefix of that being a candidate; the fresh
    solve runs ``fresh_solves`` times, on the experts relabelled by a seeded permutation after
    the first (``fresh_solve``), which sends the search down another path. The net saving of a
    candidate is its predicted saving over ``interval`` steps at the window's tokens per step
    (cross-rank bytes; cross-node bytes under ``node_dedup``) minus the bytes it copies over
    that link (``copies_across``; ``Attempt.bytes_moved`` reports all it moves); the best
    one is applied when its saving covers its bytes (``always``: whenever it moves a slot, for
    checks that the switch is exact), else skipped. ``node_dedup``: the dispatcher deduplicates
    per node (cross-node rows follow the distinct nodes of a token, see ``rows_per_step``; the
    cut then values node co-location as such). Returns the placement to switch to (None when
    skipped) and the attempt's record;
    ``Attempt.candidate`` names the one judged."""
    from folding.placement.solver import solve

    started = time.perf_counter()
    deadline = None if time_limit is None else started + time_limit

    def skipped(reason: str, slots: int = 0, moved: int = 0, saving: float = 0.0,
                node_saving: float = 0.0, before: float = 0.0, after: float = 0.0,
                candidate: str = "", across: int = 0):
        return None, Attempt(step, slots, moved, saving, node_saving, False, reason,
                             time.perf_counter() - started, None, before, after, candidate,
                             across)

    if stats.steps == 0 or stats.counts.sum() == 0:
        return skipped("no routing statistics")
    if max_moved <= 0:
        return skipped("move budget is 0")
    unknown = set(candidates) - {"warm", "cut"}
    if unknown or not candidates:
        raise FoldingError(f"unknown re-placement candidates {sorted(unknown)}: use warm, cut")

    def left() -> Optional[float]:
        return None if deadline is None else max(deadline - time.perf_counter(), 1e-3)

    found: List[Tuple[str, Placement]] = []
    if "warm" in candidates:
        result = solve(stats, current.ep_size, current.gpus_per_node, "training",
                       redundant=current.redundant_slots, time_limit=left(), previous=current,
                       max_moved=max_moved, workers=1)
        found.append(("warm", align_to_previous(result.placement, current)))
    if "cut" in candidates and not current.redundant_slots:
        for seed in range(max(fresh_solves, 1)):
            fresh = fresh_solve(stats, current, seed, left())
            tag = "cut" if seed == 0 else f"cut (seed {seed})"
            found += [(f"{tag} {i + 1}", p) for i, p in
                      enumerate(cut_to_budget(current, fresh, stats, max_moved, node_dedup))]
            if deadline is not None and time.perf_counter() > deadline:
                break

    before = rows_per_step(current, stats, node_dedup)
    scale = PASSES_PER_STEP * costs.row_bytes * interval
    # Under node-level deduplication a token's rows relay through one rank of each remote
    # node, which the distinct-rank count does not follow: the saving counted is cross-node.
    # The moves are weighed on the same link: an expert copied inside a node (NVLink) does not
    # load the network whose bytes the saving counts.
    measure, level = ("cross_node", "node") if node_dedup else ("cross_rank", "rank")
    slot_bytes = costs.expert_bytes * costs.copies
    best = None
    for name, new in found:
        slots = changed_slots(current, new)
        if slots == 0:
            continue
        after = rows_per_step(new, stats, node_dedup)
        saving = (before[measure] - after[measure]) * scale
        across = copies_across(current, new, level) * slot_bytes
        if best is None or saving - across > best[3] - best[4]:
            best = (name, new, slots, saving, across, after)
    if best is None:
        return skipped("the solver kept every slot", 0, 0, 0.0, 0.0, before["cross_node"],
                       before["cross_node"])
    name, new, slots, saving, across, after = best
    node_saving = (before["cross_node"] - after["cross_node"]) * scale
    moved = slots * slot_bytes
    if (saving < across or saving <= 0) and not always:
        return skipped("predicted saving does not cover the bytes moved", slots, moved, saving,
                       node_saving, before["cross_node"], after["cross_node"], name, across)
    reason = "saving covers the move" if saving >= across else "applied whatever it saves"
    return new, Attempt(step, slots, moved, saving, node_saving, True, reason,
                        time.perf_counter() - started, None, before["cross_node"],
                        after["cross_node"], name, across)


# ---------------------------------------------------------------------------- replayed
def replay(windows: Sequence[RoutingStatistics], start: Placement, interval: int,
           max_moved: float, costs: MoveCosts, delay: int = 3, node_dedup: bool = False,
           time_limit: Optional[float] = 10.0
           ) -> Tuple[List[float], List[Attempt], List[Placement]]:
    """The decisions ``Replacer`` would take on recorded routing, one ``RoutingStatistics`` per
    step (``windows``): every ``interval`` steps ``decide`` on the steps since the last attempt,
    the result switched in ``delay`` steps later. The folded dispatcher's outputs do not depend
    on the placement, so recorded routing is what the run would have routed whatever it
    placed. Returns the predicted cross-node rows of every step, the attempts and the placement
    in force at every step."""
    placement, pending, series, attempts, placed = start, None, [], [], []
    window = RoutingStatistics.empty(start.num_experts, start.num_layers, windows[0].top_k)
    for index, stats in enumerate(windows):
        step = index + 1
        if pending is not None and step - 1 >= pending[0]:  # switched after step pending[0]
            placement, pending = pending[1], None
            attempts[-1].applied_at = step - 1
        series.append(rows_per_step(placement, stats, node_dedup)["cross_node"])
        placed.append(placement)
        window = window.added(stats)
        if pending is None and step % interval == 0:
            new, attempt = decide(placement, window, step, interval, max_moved, costs, time_limit,
                                  node_dedup=node_dedup)
            attempts.append(attempt)
            window = RoutingStatistics.empty(start.num_experts, start.num_layers, stats.top_k)
            if new is not None:
                pending = (step + delay, new)
    if pending is not None:
        attempts[-1].applied, attempts[-1].reason = False, "training ended before the switch"
    return series, attempts, placed
