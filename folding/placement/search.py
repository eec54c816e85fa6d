"""Swap local search over the items (expert replicas) of one MoE layer.

The layer's cost is a linear part (``linear[v, r]``: the cost of item v on rank r, e.g. hops to
fixed neighbouring layers) minus the affinity of items that share a rank (weight
``rank_weight``) or a node (``node_weight``). A swap of two items on different ranks keeps every
rank's item count; all swap gains of the layer are one V x V matrix computed from per-rank and
per-node affinity sums, which each applied swap updates in O(V). Each round applies the best
swaps on pairwise disjoint ranks (and disjoint nodes for swaps across nodes): their gains do not
interact, so the cost drops by exactly their sum. ``max_moved`` limits how many items may leave
their ``home`` rank.

Balance constraint. The placement is fitted on one sample of tokens and used on others, so the
search bounds the expected peak load on a fresh sample rather than the peak on the fitted one:
a rank's count on a fresh sample is roughly normal around its load, with variance
load + 2 x (affinity of the pairs of items it holds), because a token sends one pair to each of
its experts and co-activated items on one rank load it in bursts; the difference to the fitted
count has twice that variance. For any threshold t, E[max_r X_r] <= t + sum_r E[(X_r - t)+], so
the search keeps the *excess* sum_r E[(X_r - t)+] under a budget (``balance_bound`` gives the
threshold that makes the bound tightest for a reference assignment). Unlike a cap on each rank,
the excess counts how many ranks sit close to the peak, which is what raises the peak on unseen
tokens.

How much search an instance gets, for both objectives, is decided here too: perturbation
restarts per layer (``kicks_for``) and the size from which an instance counts as large
(``is_large``).
"""

from __future__ import annotations

import time
from typing import Optional, Tuple

import numpy as np
from scipy.special import ndtr

NEGATIVE = -np.inf
ROUND_TOLERANCE = 1e-4
"""A round of swaps that gains less than this share of the layer's cost ends the search."""
INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)
LARGE_INSTANCE = 4_000_000
"""Layers x items^2 (one swap-gain matrix per layer) from which an instance is large: training
layers are then placed by several processes (below it, starting them costs more than they
save), and later inference passes skip the assignment restarts (at DeepSeek-V3 scale, half
the time for 1.3% more hop cost)."""


def is_large(num_layers: int, num_items: int) -> bool:
    return num_layers * num_items * num_items >= LARGE_INSTANCE


def kicks_for(num_items: int) -> int:
    """Perturbation restarts per layer: many on small layers, none on large ones, where a
    restart costs more than it finds."""
    return min(100, 20_000 // (num_items * num_items))


def fresh_sample_spread(load, inner):
    """Standard deviation of a rank's count on a fresh sample minus its fitted count."""
    return np.sqrt(2.0 * np.maximum(load + 2.0 * inner, 1e-12))


def expected_excess(load, inner, threshold: float, noise: bool = True):
    """E[(X - threshold)+] for a rank's count X on a fresh sample of tokens (module docstring);
    without ``noise``, (load - threshold)+ on the fitted tokens."""
    if not np.isfinite(threshold):
        return np.zeros_like(np.asarray(load, dtype=np.float64))
    if not noise:
        return np.maximum(load - threshold, 0.0)
    spread = fresh_sample_spread(load, inner)
    z = (load - threshold) / spread
    return spread * INV_SQRT_2PI * np.exp(-0.5 * z * z) + (load - threshold) * ndtr(z)


def host_sums(matrix: np.ndarray, item_rank: np.ndarray, num_ranks: int) -> np.ndarray:
    """[V, P]: for every row v, the sum of ``matrix[v, u]`` over the items u on each rank."""
    out = np.zeros((matrix.shape[0], num_ranks))
    order = np.argsort(item_rank, kind="stable")
    ranks, starts = np.unique(item_rank[order], return_index=True)
    out[:, ranks] = np.add.reduceat(matrix[:, order], starts, axis=1)
    return out


def rank_inner_affinity(item_rank: np.ndarray, num_ranks: int, affinity: Optional[np.ndarray],
                        rank_affinity: Optional[np.ndarray] = None) -> np.ndarray:
    """[P]: affinity summed over the pairs of items that share each rank."""
    if affinity is None:
        return np.zeros(num_ranks)
    if rank_affinity is None:
        rank_affinity = host_sums(affinity, item_rank, num_ranks)
    own = rank_affinity[np.arange(len(item_rank)), item_rank]
    return 0.5 * np.bincount(item_rank, weights=own, minlength=num_ranks)


def balance_bound(item_rank: np.ndarray, item_load: np.ndarray, num_ranks: int,
                  affinity: Optional[np.ndarray], noise: bool = True) -> Tuple[float, float]:
    """(threshold t, bound U): the t that makes U = t + excess(t) the tightest bound on the
    expected peak load on a fresh sample of tokens, found where sum_r P(X_r > t) = 1. Without
    ``noise``, U is the peak load and t the second highest rank load."""
    load = np.bincount(item_rank, weights=item_load, minlength=num_ranks)
    inner = rank_inner_affinity(item_rank, num_ranks, affinity)
    if num_ranks < 2:
        return np.inf, float(load.max())
    if not noise:
        ordered = np.sort(load)
        return float(ordered[-2]), float(ordered[-1])
    spread = fresh_sample_spread(load, inner)
    low, high = float(load.min() - 10 * spread.max()), float(load.max() + 10 * spread.max())
    for _ in range(100):
        middle = 0.5 * (low + high)
        if ndtr((load - middle) / spread).sum() > 1.0:
            low = middle
        else:
            high = middle
    threshold = 0.5 * (low + high)
    return threshold, threshold + float(expected_excess(load, inner, threshold).sum())


class LayerSearch:
    """Rank assignment of one layer's items, improved by swaps."""

    def __init__(self, item_rank: np.ndarray, item_load: np.ndarray, rank_nodes: np.ndarray,
                 threshold: float = np.inf, excess_budget: float = np.inf,
                 affinity: Optional[np.ndarray] = None, rank_weight: float = 1.0, node_weight: float = 0.0,
                 linear: Optional[np.ndarray] = None, home: Optional[np.ndarray] = None,
                 max_moved: Optional[int] = None, noise: bool = True):
        self.rank = np.array(item_rank, dtype=np.int64)
        self.item_load = np.asarray(item_load, dtype=np.float64)
        self.rank_nodes = np.asarray(rank_nodes, dtype=np.int64)
        self.num_ranks = len(self.rank_nodes)
        self.num_nodes = int(self.rank_nodes.max()) + 1
        self.threshold = float(threshold)
        self.excess_budget = float(excess_budget)
        self.affinity = affinity
        self.rank_weight = rank_weight
        self.node_weight = node_weight if self.num_nodes > 1 else 0.0
        self.linear = linear
        self.linear_t = None if linear is None else np.ascontiguousarray(linear.T)
        self.home = None if home is None else np.asarray(home, dtype=np.int64)
        self.max_moved = max_moved
        self.noise = noise
        self.tolerance = 1e-9 * max(1.0, float(self.item_load.sum()))
        self.rank_load = np.bincount(self.rank, weights=self.item_load, minlength=self.num_ranks)
        if affinity is not None:
            # rank_affinity[v, r]: affinity of item v to the items on rank r (node likewise).
            self.rank_affinity = host_sums(affinity, self.rank, self.num_ranks)
            self.node_affinity = host_sums(self.rank_affinity, self.rank_nodes, self.num_nodes)
            # The same table rank-major, kept equal bit for bit: ``gains`` reads it by rows
            # where the other would be read by columns.
            self.rank_affinity_t = np.ascontiguousarray(self.rank_affinity.T)
            # The pair terms of every swap gain (``gains``), computed once per layer.
            if self.rank_weight or self.node_weight:
                self.pair_cost = (2.0 * (self.rank_weight + self.node_weight)) * affinity
                self.pair_node_refund = (2.0 * self.node_weight) * affinity if self.node_weight else None
        self.rank_inner = rank_inner_affinity(self.rank, self.num_ranks, affinity,
                                              getattr(self, "rank_affinity", None))

    # ------------------------------------------------------------------------------ measures
    @property
    def moved(self) -> int:
        return 0 if self.home is None else int(np.sum(self.rank != self.home))

    @property
    def constrained(self) -> bool:
        return np.isfinite(self.threshold) and np.isfinite(self.excess_budget)

    def within_budget(self) -> bool:
        """Whether the excess is within its budget (up to rounding)."""
        return self.excess() <= self.excess_budget + self.tolerance

    def excess(self) -> float:
        return float(expected_excess(self.rank_load, self.rank_inner, self.threshold, self.noise).sum())

    def cost(self) -> float:
        """Linear cost minus weighted affinity of co-located pairs (lower is better)."""
        total = 0.0
        items = np.arange(len(self.rank))
        if self.linear is not None:
            total += float(self.linear[items, self.rank].sum())
        if self.affinity is not None:
            total -= 0.5 * self.rank_weight * float(self.rank_affinity[items, self.rank].sum())
            if self.node_weight:
                total -= 0.5 * self.node_weight * float(
                    self.node_affinity[items, self.rank_nodes[self.rank]].sum())
        return total

    def gains(self) -> np.ndarray:
        """[V, V]: cost reduction of swapping items v and u (-inf where not a swap).

        Every term has the form value[v, host of u] + value[u, host of v] - value[v, own host]
        - value[u, own host] (``pair_gain``), so the rank, node and linear terms are summed into
        one [V, P] table first. The pair itself never shares a host before or after: -2 C per
        level, except that a pair inside one node keeps sharing it.
        """
        rank = self.rank
        V = len(rank)
        # value[v, r] and value_t[r, v] hold the same numbers, computed the same way, so that
        # both gathers below read rows; value[:, rank] + its transpose would cost a strided pass.
        value = np.zeros((V, self.num_ranks))
        value_t = np.zeros((self.num_ranks, V))
        # Affinity enters only with a weight (the inference search passes it for balance only).
        paired = self.affinity is not None and (self.rank_weight or self.node_weight)
        if paired:
            value += self.rank_weight * self.rank_affinity
            value_t += self.rank_weight * self.rank_affinity_t
            if self.node_weight:
                value += self.node_weight * self.node_affinity[:, self.rank_nodes]
                value_t += self.node_weight * np.ascontiguousarray(self.node_affinity.T)[self.rank_nodes]
        if self.linear is not None:
            value -= self.linear
            value_t -= self.linear_t
        items = np.arange(V)
        to_partner = np.take(value, rank, axis=1)
        gain = pair_gain(to_partner, value[items, rank], None, value_t[rank], out=to_partner)
        if paired:
            gain -= self.pair_cost
            if self.node_weight:
                node = self.rank_nodes[rank]
                np.add(gain, self.pair_node_refund, out=gain, where=node[:, None] == node[None, :])
        np.copyto(gain, NEGATIVE, where=rank[:, None] == rank[None, :])
        return gain

    def excess_change(self, v: Optional[np.ndarray] = None, u: Optional[np.ndarray] = None) -> np.ndarray:
        """Change of the layer's excess if v and u swap: for the given pairs of items, or as a
        [V, V] matrix for all of them (0 without a constraint)."""
        V = len(self.rank)
        if v is None:
            v, u = np.divmod(np.arange(V * V), V)
            return self.excess_change(v, u).reshape(V, V)
        if not self.constrained:
            return np.zeros(len(v))
        w, rank = self.item_load, self.rank
        before = expected_excess(self.rank_load, self.rank_inner, self.threshold, self.noise)
        change = np.zeros(len(v))
        for a, b in ((v, u), (u, v)):  # a leaves its rank, b arrives there
            host = rank[a]
            load = self.rank_load[host] - w[a] + w[b]
            inner = self.rank_inner[host]
            if self.affinity is not None and self.noise:
                inner = inner - self.rank_affinity[a, host] + self.rank_affinity[b, host] - self.affinity[a, b]
            change += expected_excess(load, inner, self.threshold, self.noise) - before[host]
        return change

    def _moves_after(self) -> Optional[np.ndarray]:
        """[V, V]: change in the number of items away from home if v and u swap."""
        if self.home is None:
            return None
        away = (self.rank != self.home).astype(np.int64)
        lands_away = (self.rank[None, :] != self.home[:, None]).astype(np.int64)  # v on u's rank
        return lands_away + lands_away.T - away[:, None] - away[None, :]

    # ------------------------------------------------------------------------------ moves
    def swap(self, v: int, u: int) -> None:
        ra, rb = self.rank[v], self.rank[u]
        if self.affinity is not None:
            delta = self.affinity[:, u] - self.affinity[:, v]
            self.rank_affinity[:, ra] += delta
            self.rank_affinity[:, rb] -= delta
            self.rank_affinity_t[ra] += delta
            self.rank_affinity_t[rb] -= delta
            na, nb = self.rank_nodes[ra], self.rank_nodes[rb]
            if na != nb:
                self.node_affinity[:, na] += delta
                self.node_affinity[:, nb] -= delta
        shift = self.item_load[u] - self.item_load[v]
        self.rank_load[ra] += shift
        self.rank_load[rb] -= shift
        self.rank[v], self.rank[u] = rb, ra
        if self.affinity is not None:
            for r in (ra, rb):
                on_rank = np.flatnonzero(self.rank == r)
                self.rank_inner[r] = 0.5 * self.rank_affinity[on_rank, r].sum()

    def repair(self, max_steps: Optional[int] = None) -> bool:
        """Swap until the excess is within budget; True on success.

        Takes the cheapest swap that reaches the budget if one exists, otherwise the swap that
        lowers the excess most; gives up when no swap lowers it. The move budget is never broken.
        """
        if not self.constrained:
            return True
        steps = max_steps if max_steps is not None else 4 * len(self.rank)
        for _ in range(steps):
            excess = self.excess()
            if excess <= self.excess_budget + self.tolerance:
                return True
            after = excess + self.excess_change()
            gain = self.gains()
            valid = np.isfinite(gain)
            moves = self._moves_after()
            if moves is not None:
                valid &= self.moved + moves <= self.max_moved
            fixes = valid & (after <= self.excess_budget)
            if fixes.any():
                choice = np.argmax(np.where(fixes, gain, NEGATIVE))
            else:
                after = np.where(valid, after, np.inf)
                choice = np.argmin(after)
                if after.flat[choice] >= excess - self.tolerance:
                    return False
            v, u = np.unravel_index(choice, after.shape)
            self.swap(int(v), int(u))
        return self.within_budget()

    def improve(self, deadline: Optional[float] = None, max_rounds: int = 10_000,
                price: Optional[float] = None) -> float:
        """Apply improving swaps until none is left (or the deadline); returns the total gain.

        With ``price`` the excess is not bounded but costs ``price`` per unit instead. Under the
        hard budget the excess change is computed for the improving swaps only.
        """
        V = len(self.rank)

        def upper(flat: np.ndarray) -> np.ndarray:
            # Gains are symmetric: each swap once, as (v, u) with v < u.
            return flat[flat // V < flat % V]

        total = 0.0
        # Rounds that gain less than this share of the cost are not worth their price on
        # large layers; the last of them is still applied.
        small_round = ROUND_TOLERANCE * abs(self.cost())
        for _ in range(max_rounds):
            if deadline is not None and time.perf_counter() > deadline:
                break
            gain = self.gains()
            moves = self._moves_after()
            if moves is not None:
                np.copyto(gain, NEGATIVE, where=self.moved + moves > self.max_moved)
            room = np.inf
            if price:
                # A swap cannot lower the excess by more than its two ranks hold now, which
                # rules out most pairs before their excess change is computed.
                held = expected_excess(self.rank_load, self.rank_inner, self.threshold, self.noise)[self.rank]
                gain = gain.ravel()
                candidates = upper(np.flatnonzero(gain + price * (held[:, None] + held[None, :]).ravel() > self.tolerance))
                change = self.excess_change(*np.divmod(candidates, V))
                gain[candidates] -= price * change
                keep = gain[candidates] > self.tolerance
                candidates, change = candidates[keep], change[keep]
            else:
                gain = gain.ravel()
                candidates = upper(np.flatnonzero(gain > self.tolerance))
                change = np.zeros(len(candidates))
                if price is None and self.constrained and len(candidates):
                    room = self.excess_budget - self.excess()
                    change = self.excess_change(*np.divmod(candidates, V))
                    fits = change <= room + self.tolerance
                    candidates, change = candidates[fits], change[fits]
            if candidates.size == 0:
                exchanged = self._exchange_ranks()
                if exchanged <= 0:
                    break
                total += exchanged
                continue
            order = best_first(gain[candidates], 4 * self.num_ranks)
            applied = self._apply_disjoint(candidates[order], gain[candidates[order]], change[order], room, moves)
            total += applied
            if applied < small_round:
                break
        return total

    def _exchange_ranks(self) -> float:
        """Swap the whole contents of two ranks on different nodes when that gains: rank loads
        stay as they are and only node-level terms change, a move that item swaps reach only
        through a series of losing steps. Not used with a ``home`` (it moves whole ranks)."""
        if self.home is not None or self.num_nodes < 2 or len(self.rank) == self.num_ranks:
            return 0.0
        P = self.num_ranks
        gain = np.zeros((P, P))
        node = self.rank_nodes
        if self.affinity is not None and self.node_weight:
            between = host_sums(self.rank_affinity.T, self.rank, P)  # [P, P] affinity of rank pairs
            np.fill_diagonal(between, 0.0)
            to_nodes = host_sums(between, node, self.num_nodes)
            gain += self.node_weight * pair_gain(to_nodes[:, node], to_nodes[np.arange(P), node], between)
        if self.linear is not None:
            linear = host_sums(self.linear.T, self.rank, P).T  # [a, b]: items of rank a placed on b
            here = np.diag(linear)
            gain += here[:, None] + here[None, :] - linear - linear.T
        gain[node[:, None] == node[None, :]] = NEGATIVE
        a, b = np.unravel_index(np.argmax(gain), gain.shape)
        if gain[a, b] <= self.tolerance:
            return 0.0
        for v, u in zip(np.flatnonzero(self.rank == a), np.flatnonzero(self.rank == b)):
            self.swap(int(v), int(u))
        return float(gain[a, b])

    def reduce_moves(self) -> bool:
        """Swap items back towards their home until at most ``max_moved`` are away, losing the
        least cost per item brought home and keeping the excess within budget."""
        if self.home is None or self.max_moved is None:
            return True
        while self.moved > self.max_moved:
            gain = self.gains()
            moves = self._moves_after()
            usable = np.isfinite(gain) & (moves < 0)
            if self.constrained:
                usable &= self.excess() + self.excess_change() <= self.excess_budget + self.tolerance
            if not usable.any():
                return False
            score = np.where(usable, gain / np.maximum(-moves, 1), NEGATIVE)
            v, u = np.unravel_index(np.argmax(score), score.shape)
            self.swap(int(v), int(u))
        return True

    def reassign_most_misplaced(self, count: int) -> None:
        """Move the ``count`` items that would gain most elsewhere, as one assignment problem:
        they trade places among the ranks they occupy (a cycle of moves, which pairwise swaps
        only reach through losing steps), scored against the items that stay."""
        from scipy.optimize import linear_sum_assignment

        if count < 2 or self.affinity is None:
            return
        items = np.arange(len(self.rank))
        node = self.rank_nodes
        score = np.zeros((len(items), self.num_ranks))  # value of each item on each rank
        if self.rank_weight:
            score += self.rank_weight * self.rank_affinity
        if self.node_weight:
            score += self.node_weight * self.node_affinity[:, node]
        if self.linear is not None:
            score -= self.linear
        desire = score.max(axis=1) - score[items, self.rank]
        chosen = np.argsort(-desire, kind="stable")[:count]
        slots = self.rank[chosen].copy()
        # Score against the items that stay: remove the chosen items' own contributions.
        value = score[np.ix_(chosen, slots)]
        for j, slot in enumerate(slots):
            on_slot = chosen[slots == slot]
            value[:, j] -= self.rank_weight * self.affinity[np.ix_(chosen, on_slot)].sum(axis=1)
            same_node = chosen[node[slots] == node[slot]]
            value[:, j] -= self.node_weight * self.affinity[np.ix_(chosen, same_node)].sum(axis=1)
        rows, cols = linear_sum_assignment(-value)
        target_of = dict(zip(chosen[rows].tolist(), slots[cols].tolist()))
        for v in chosen.tolist():
            want = target_of[v]
            if self.rank[v] == want:
                continue
            # A chosen item still on the wanted rank that belongs elsewhere always exists: the
            # chosen items' ranks and their targets are the same multiset.
            u = next(x for x in chosen.tolist() if x != v and self.rank[x] == want and target_of[x] != want)
            self.swap(v, u)

    def optimise(self, deadline: Optional[float] = None, price_growth: float = 4.0,
                 max_stages: int = 40) -> None:
        """Improve under the balance constraint by continuation on the price of excess: first
        free, then with a price that doubles until the excess fits the budget, then repaired and
        improved under the hard budget. Swaps that trade a little excess for a large gain, and
        later swaps that win the excess back cheaply, are found this way; a hard budget from the
        start would refuse the first kind."""
        if not self.constrained:
            self.improve(deadline)
            return
        self.improve(deadline, price=0.0)
        excess = self.excess()
        if excess > self.excess_budget:
            price = 1e-3 * abs(self.cost()) / max(excess - self.excess_budget, self.tolerance)
            for _ in range(max_stages):
                if self.excess() <= self.excess_budget or (deadline is not None and time.perf_counter() > deadline):
                    break
                self.improve(deadline, price=price)
                price *= price_growth
        self.repair()
        self.improve(deadline)

    def _apply_disjoint(self, candidates: np.ndarray, gains: np.ndarray, changes: np.ndarray, room: float,
                        moves: Optional[np.ndarray]) -> float:
        """Apply the best candidates (flat pair indices, best first) whose ranks (and nodes,
        across nodes) are disjoint, while their summed excess change and moves stay in budget."""
        V = len(self.rank)
        used_ranks, used_nodes = set(), set()
        moved = self.moved
        chosen = []
        applied = 0.0
        for index, gain, change in zip(candidates, gains, changes):
            v, u = divmod(int(index), V)
            ra, rb = int(self.rank[v]), int(self.rank[u])
            if ra in used_ranks or rb in used_ranks:
                continue
            na, nb = int(self.rank_nodes[ra]), int(self.rank_nodes[rb])
            crosses = na != nb and self.node_weight
            if crosses and (na in used_nodes or nb in used_nodes):
                continue
            if change > room + self.tolerance:
                continue
            if moves is not None:
                if moved + moves[v, u] > self.max_moved:
                    continue
                moved += moves[v, u]
            room -= change
            used_ranks.update((ra, rb))
            if crosses:
                used_nodes.update((na, nb))
            chosen.append((v, u))
            applied += gain
        for v, u in chosen:
            self.swap(v, u)
        return applied


def best_first(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` largest values, largest first; ties in index order, as a stable
    sort of all values would give them."""
    if len(values) > 2 * count:
        # Everything at least as large as the count-th value takes part in the sort, so ties
        # at the cut keep their index order.
        cut = np.partition(values, len(values) - count)[len(values) - count]
        keep = np.flatnonzero(values >= cut)
        return keep[np.argsort(-values[keep], kind="stable")][:count]
    return np.argsort(-values, kind="stable")[:count]


def pair_gain(to_partner_host: np.ndarray, to_own_host: np.ndarray,
              affinity: Optional[np.ndarray], from_partner_host: Optional[np.ndarray] = None,
              out: Optional[np.ndarray] = None) -> np.ndarray:
    """[V, V]: change of co-located value when v and u trade hosts.

    ``to_partner_host[v, u]`` is v's value on u's host, ``to_own_host[v]`` v's value on its own
    host; with ``affinity``, the pair itself never shares a host before or after, hence the -2
    affinity term. ``from_partner_host``, the transpose of ``to_partner_host`` laid out by rows,
    saves transposing it here; ``out`` (which may be ``to_partner_host``) receives the gains.
    """
    if from_partner_host is None:
        from_partner_host = to_partner_host.T
    gain = np.add(to_partner_host, from_partner_host, out=out)
    gain -= to_own_host[:, None]
    gain -= to_own_host[None, :]
    if affinity is not None:
        gain -= 2.0 * affinity
    return gain
