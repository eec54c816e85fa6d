"""Pure routing arithmetic of the folded dispatcher: which replica serves each (token, expert)
pair, and what one rank sends to each other rank. No communication, no autograd needed.

Notation: T local tokens, E logical experts, P ranks in the EP group, S slots per rank; slot s
lives on EP rank s // S and holds logical expert ``slot_expert[s]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch


class SlotMap:
    """One MoE layer's placement, as tensors, with what every dispatch needs precomputed."""

    def __init__(self, slot_expert: torch.Tensor, slots_per_rank: int, rank_node: torch.Tensor):
        self.slot_expert = slot_expert.long()
        """int64 [P*S]: the logical expert of every slot."""
        self.slots_per_rank = slots_per_rank
        self.rank_node = rank_node.long()
        """int64 [P]: the node of every EP rank."""
        self.num_ranks = self.slot_expert.numel() // slots_per_rank
        self.slot_rank = torch.arange(self.slot_expert.numel()) // slots_per_rank
        experts = int(self.slot_expert.max()) + 1
        self.replicas: List[torch.Tensor] = [torch.nonzero(self.slot_expert == e).flatten()
                                             for e in range(experts)]
        """Slots of every logical expert, in slot order."""
        self.single_slot = torch.tensor([w[0] if w.numel() == 1 else -1 for w in self.replicas],
                                        dtype=torch.long)
        """The slot of each expert that has exactly one, else -1."""
        self.replicated = [e for e, w in enumerate(self.replicas) if w.numel() > 1]


def _greedy_least_loaded(loads: torch.Tensor, count: int) -> torch.Tensor:
    """Indices into ``loads`` for ``count`` items given one at a time to the least-loaded
    candidate (ties: the lower index), exactly as the sequential greedy rule would.

    Candidate i receives its k-th item when its level is loads[i] + k; sorting the (level, i)
    keys of every item any candidate can receive gives the order of the greedy choices.
    """
    if count == 0:
        return torch.empty(0, dtype=torch.long)
    candidates = loads.numel()
    levels = loads.view(-1, 1) + torch.arange(count).view(1, -1)  # [m, count]
    keys = levels * candidates + torch.arange(candidates).view(-1, 1)
    order = torch.argsort(keys.flatten())[:count]
    return order // count


def choose_replicas(routing_map: torch.Tensor, slots: SlotMap, own_rank: int) -> torch.Tensor:
    """The slot that serves each routed (token, expert) pair; -1 where not routed.

    Replica rule, deterministic: a replica on a rank the token is already being sent to (for
    its other experts), else one on the token's own rank, else one on its own node, else the
    replica least loaded in this batch so far. Experts with one replica are fixed first;
    replicated experts are resolved in expert order, tokens in token order.
    """
    tokens, experts = routing_map.shape
    slot_rank = slots.slot_rank
    replicas = slots.replicas
    if not slots.replicated:  # one slot per expert: nothing to choose
        return torch.where(routing_map, slots.single_slot.expand(tokens, experts), -1)
    single = routing_map & (slots.single_slot >= 0)
    chosen = torch.where(single, slots.single_slot.expand(tokens, experts), -1)
    sending = torch.zeros(tokens, slots.num_ranks, dtype=torch.bool)
    pair_token, pair_expert = torch.nonzero(single, as_tuple=True)
    sending[pair_token, slot_rank[slots.single_slot[pair_expert]]] = True
    load = torch.bincount(chosen[single], minlength=slots.slot_expert.numel())
    replicated = slots.replicated
    own_node = slots.rank_node[own_rank]
    for e in replicated:
        where = replicas[e]
        ranks = slot_rank[where]
        routed = torch.nonzero(routing_map[:, e]).flatten()
        if routed.numel() == 0:
            continue
        pick = torch.full((routed.numel(),), -1, dtype=torch.long)
        preferences = (sending[routed][:, ranks],                                  # already sent to
                       (ranks == own_rank).expand(routed.numel(), -1),            # own rank
                       (slots.rank_node[ranks] == own_node).expand(routed.numel(), -1))  # own node
        for allowed in preferences:
            open_ = (pick < 0) & allowed.any(dim=1)
            # The first allowed replica in slot order.
            pick[open_] = allowed[open_].int().argmax(dim=1)
        rest = torch.nonzero(pick < 0).flatten()
        if rest.numel():
            # Loads of the resolved picks count before the least-loaded choice is made.
            resolved = pick[pick >= 0]
            base = load[where] + torch.bincount(resolved, minlength=where.numel())
            pick[rest] = _greedy_least_loaded(base, rest.numel())
        slot = where[pick]
        chosen[routed, e] = slot
        sending[routed, slot_rank[slot]] = True
        load.index_add_(0, slot, torch.ones_like(slot))
    return chosen


@dataclass
class SendPlan:
    """What one rank sends: one row per (token, destination rank), grouped by destination."""

    row_token: torch.Tensor
    """int64 [N]: the local token of each row."""
    send_counts: torch.Tensor
    """int64 [P]: rows for each destination rank."""
    pair_row: torch.Tensor
    """int64 [K]: the row of each routed (token, expert) pair."""
    pair_local_slot: torch.Tensor
    """int64 [K]: the destination's local slot of each pair."""
    pair_token: torch.Tensor
    pair_expert: torch.Tensor


def plan_sends(chosen: torch.Tensor, slots_per_rank: int, num_ranks: int) -> SendPlan:
    """Deduplicate: a token goes once to each distinct rank that hosts one of its chosen slots.

    Rows are the (destination, token) cells of a [P, T] mask in row-major order, so they come
    grouped by destination and numbered by a running count, without sorting.
    """
    pair_token, pair_expert = torch.nonzero(chosen >= 0, as_tuple=True)
    slot = chosen[pair_token, pair_expert]
    dest = slot // slots_per_rank
    tokens = chosen.shape[0]
    cell = dest * tokens + pair_token
    sent = torch.zeros(num_ranks * tokens, dtype=torch.bool)
    sent[cell] = True
    row_of_cell = torch.cumsum(sent, 0) - 1
    row_cells = torch.nonzero(sent).flatten()
    return SendPlan(row_token=row_cells % tokens,
                    send_counts=sent.view(num_ranks, tokens).sum(dim=1),
                    pair_row=row_of_cell[cell], pair_local_slot=slot % slots_per_rank,
                    pair_token=pair_token, pair_expert=pair_expert)


def expand_received(row_mask: torch.Tensor):
    """Pairs to compute on this rank from received rows: (row, local slot) where routed, sorted
    by local slot then row, and the number of pairs per local slot."""
    # The transposed mask's nonzero cells come in (local slot, row) order already.
    local, rows = torch.nonzero(row_mask.t(), as_tuple=True)
    return rows, local, row_mask.sum(dim=0)
